"""`testbed supervise` takes every policy flag `testbed broker` does (they share build_policy)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.broker.command import build_policy
from testbed.supervise.command import register


def _parse(words: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["supervise", *words])
    args.peer_uid = args.peer_pid = None  # as run() does: the supervisor has no peer rules
    return args


def test_flags_make_a_policy(tmp_path: Path) -> None:
    plain = build_policy(_parse(["--allow-ro", str(tmp_path), "--", "true"]))
    dirs = build_policy(_parse(["--allow-ro", str(tmp_path), "--allow-directories", "--", "true"]))
    assert plain != dirs  # --allow-directories reaches the policy


def _child_of(pid: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            if kids:
                return int(kids[0])
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for a child of {pid}")


_SLEEP_SYSCALLS = {"35", "230"}  # nanosleep, clock_nanosleep on x86-64


def _asleep(pid: int, timeout: float = 30.0) -> None:
    """Wait until `sleep` blocks in its sleep: every open it makes (ld.so, libc) is done by then.

    Killing the supervisor earlier leaves the loader's own opens unanswered
    (ENOSYS), and the command dies of that rather than of the kill.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/syscall").read_text().split()[0] in _SLEEP_SYSCALLS:
                return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {pid} to block in its sleep")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("die", [True, False], ids=["die-with-supervisor", "default"])
def test_a_killed_supervisor_takes_its_command_along_only_when_asked(die: bool) -> None:
    """QEMU's iotests kill -KILL the pid they started, which is the supervisor's."""
    flags = ["--die-with-supervisor"] if die else []
    sup = subprocess.Popen(
        [sys.executable, "-m", "testbed", "supervise", *flags, "--", "sleep", "60"]
    )
    child = _child_of(sup.pid)
    try:
        _asleep(child)
        sup.kill()
        sup.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(child) is not die
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
