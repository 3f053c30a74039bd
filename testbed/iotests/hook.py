"""The ``hooked`` mode's QEMU_PROG: a broker on a socketpair, then exec QEMU.

The suite runs ``$QEMU_PROG ARGS`` and expects QEMU itself to be that
process (it waits for it, kills it by pid, reads its stderr), so the wrapper
starts ``testbed broker --fd N`` as a child, closes the broker's end, and
*execs* the patched qemu-system with ``-open-hook-fd M`` in its own place,
argv[0] kept, so messages still begin with the name the suite's filters
replace.  The broker exits when QEMU's end of the socket closes (``--fd``
serves one peer and stops when it is gone); a parent-death SIGKILL is the
second guarantee that it is never left behind, except under ``-daemonize``,
where the QEMU that survives is a child of the one that exits.

Everything it needs comes from the environment the harness sets (the suite
passes its own environment down to QEMU):

=========================== ==================================================
``TESTBED_IOTESTS_QEMU``    the patched qemu-system to exec
``TESTBED_IOTESTS_FIRMWARE`` ``:``-separated ``-L`` directories
``TESTBED_IOTESTS_BROKER``  the broker command, JSON list (``testbed broker``)
``TESTBED_IOTESTS_RUNDIR``  where ``audit.jsonl``, ``launches.jsonl`` and
                            ``broker.log`` of this test run go
``TEST_DIR``, ``SOCK_DIR``, the suite's directories and QEMU's temporary
``TMPDIR``                  directory (``-snapshot``): granted ``create``
=========================== ==================================================

QEMU's working directory (the suite runs it from tests/qemu-iotests) is
granted read-only, so that a relative name QEMU sends absolute finds the same
file, or the same ``ENOENT``, that QEMU alone would.

This module imports nothing of the testbed: it runs once per QEMU launch
(over a thousand times in a full run), so it must start fast.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the broker's child between fork and exec.  SIGKILL, not SIGTERM:
    # once QEMU is gone nothing is left to serve (the audit log is written,
    # line-buffered, before each reply), and brokers that got SIGTERM as QEMU
    # exited were seen to hang for good in futex_wait (docs/iotests.md).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        sys.stderr.write(f"testbed iotests hook: {name} is not set (run through testbed iotests)\n")
        raise SystemExit(127)
    return value


#: The rules of the hooked broker's grants, and the supervised wrapper's
#: (modes.py): symlinks (153's absolute link), directories (vvfat scans its
#: directory through the hook since patch 0008; the suite's QEMU is not
#: confined, so a directory fd gives it nothing it does not have).
RULES = ("--allow-symlinks", "--allow-directories")


def broker_argv(
    base: Sequence[str], fd: int, create: Sequence[str], ro: Sequence[str], audit: str
) -> list[str]:
    argv = [*base, "broker", "--fd", str(fd), *RULES, "--audit", audit]
    for g in create:
        argv += ["--allow-create", g]
    for g in ro:
        argv += ["--allow-ro", g]
    return argv


def qemu_argv(
    argv0: str, firmware: Sequence[str], hook_fd: int | None, args: Sequence[str]
) -> list[str]:
    out = [argv0]
    for d in firmware:
        out += ["-L", d]
    if hook_fd is not None:
        out += ["-open-hook-fd", str(hook_fd)]
    return [*out, *args]


def main(argv: Sequence[str]) -> int:
    qemu = _env("TESTBED_IOTESTS_QEMU")
    firmware = [d for d in os.environ.get("TESTBED_IOTESTS_FIRMWARE", "").split(":") if d]
    base = json.loads(_env("TESTBED_IOTESTS_BROKER"))
    rundir = _env("TESTBED_IOTESTS_RUNDIR")
    create = [
        os.path.realpath(d)
        for d in (os.environ.get(v) for v in ("TEST_DIR", "SOCK_DIR", "TMPDIR"))
        if d and os.path.isdir(d)
    ]
    cwd = os.path.realpath(os.getcwd())
    ro = [] if any(cwd == g or cwd.startswith(g + "/") for g in create) else [cwd]
    args = list(argv[1:])
    started = time.time()
    qemu_end, broker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    daemonize = "-daemonize" in args
    with open(os.path.join(rundir, "broker.log"), "ab") as log:
        broker = subprocess.Popen(
            broker_argv(base, broker_end.fileno(), create, ro, os.path.join(rundir, "audit.jsonl")),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(broker_end.fileno(),),
            preexec_fn=None if daemonize else _die_with_parent,
        )
    broker_end.close()
    with open(os.path.join(rundir, "launches.jsonl"), "a") as launches:
        launches.write(
            json.dumps(
                {"time": started, "pid": os.getpid(), "broker_pid": broker.pid, "argv": args}
            )
            + "\n"
        )
    fd = qemu_end.detach()
    os.set_inheritable(fd, True)
    try:
        os.execv(qemu, qemu_argv(argv[0], firmware, fd, args))
    except OSError as err:
        sys.stderr.write(f"testbed iotests hook: cannot run {qemu}: {err.strerror}\n")
        os.close(fd)  # the broker sees EOF and exits
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv))
