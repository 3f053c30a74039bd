"""Console steps over a socketpair standing in for QEMU's serial port."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pexpect.fdpexpect import fdspawn

from testbed.errors import GuestError, WaitTimeout
from testbed.guest.console import Console, StepResult

Pair = tuple[Console, socket.socket, list[StepResult]]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    ours, guest = socket.socketpair()
    seen: list[StepResult] = []
    child = fdspawn(ours.fileno(), encoding="utf-8", codec_errors="replace")
    console = Console(child, tmp_path / "console.log", on_step=seen.append)
    yield console, guest, seen
    console.close()
    ours.close()
    guest.close()


def test_step_matches_and_logs_with_timestamps(pair: Pair, tmp_path: Path) -> None:
    console, guest, seen = pair
    guest.sendall(b"booting\r\nTESTBED-GUEST: ready\r\n")
    m = console.expect("boot", r"TESTBED-GUEST: ready", timeout=5)
    assert m.group(0) == "TESTBED-GUEST: ready"
    assert [s.name for s in seen] == ["boot"] and seen[0].ok
    console.close()
    lines = (tmp_path / "console.log").read_text().splitlines()
    assert lines[0].endswith("] booting")
    assert lines[0].startswith("[")


def test_command_sends_line(pair: Pair) -> None:
    console, guest, _ = pair
    guest.sendall(b"PATTERN " + b"a" * 64 + b"\r\ntb# ")
    m = console.command("pattern", "tb pattern 16", r"PATTERN ([0-9a-f]{64})", timeout=5)
    assert m.group(1) == "a" * 64
    assert guest.recv(100) == b"tb pattern 16\n"


def test_failure_pattern_raises_guest_error(pair: Pair) -> None:
    console, guest, seen = pair
    guest.sendall(b"[ 1.0] Kernel panic - not syncing: VFS\r\n")
    with pytest.raises(GuestError, match="Kernel panic") as info:
        console.expect("boot", r"TESTBED-GUEST: ready", timeout=5)
    assert info.value.step == "boot"
    assert "Kernel panic" in info.value.console_tail
    assert not seen[-1].ok


def test_timeout_names_the_step_and_pattern(pair: Pair) -> None:
    console, _, _ = pair
    want = r"timed out after 0.3s waiting for guest step 'x'"
    with pytest.raises(GuestError, match=want) as info:
        console.expect("x", r"never", timeout=0.3)
    assert isinstance(info.value.__cause__, WaitTimeout)


def test_closed_console_is_reported(pair: Pair) -> None:
    console, guest, _ = pair
    guest.close()
    with pytest.raises(GuestError, match="console closed"):
        console.expect("boot", r"ready", timeout=5)
