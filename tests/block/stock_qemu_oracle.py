"""Test helper: what Debian's QEMU 7.2 opens (strace), and the model's trace in that shape.

Both become lists of ``(path relative to the image directory, flag names
without O_CLOEXEC/O_LARGEFILE, mode or None, "ok" or the errno name)``.
QEMU runs with ``-nodefaults -display none -accel tcg`` and QMP over a
socketpair; opens outside the image directory (firmware, /dev/sgx_vepc)
are dropped.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from testbed.block.opener import OpenEvent

QEMU = "/usr/bin/qemu-system-x86_64"
Entry = tuple[str, str, str | None, str]

_LINE = re.compile(r"^(\d+)\s+(.*)$")
_OPEN = re.compile(
    r'(?:openat|open)\((?:AT_FDCWD, )?"((?:[^"\\]|\\.)*)", ([A-Z_|0-9]+)(?:, (0\d*))?\)'
    r" = (-?\d+)(?: (E[A-Z]+))?"
)
_DROP = {"O_CLOEXEC", "O_LARGEFILE"}


def available() -> bool:
    return os.path.exists(QEMU) and shutil.which("strace") is not None


def _flags(names: Iterable[str]) -> str:
    return "|".join(n for n in names if n not in _DROP)


def _rel(path: str, root: str) -> str | None:
    if not path.startswith(root.rstrip("/") + "/"):
        return None
    return path[len(root.rstrip("/")) + 1 :]


def parse_strace(text: str, root: str) -> list[Entry]:
    pending: dict[str, str] = {}
    out: list[Entry] = []
    for raw in text.splitlines():
        m = _LINE.match(raw)
        if not m:
            continue
        pid, rest = m.groups()
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")].rstrip()
            continue
        resumed = re.match(r"<\.\.\. \w+ resumed>(.*)", rest)
        if resumed:
            rest = pending.pop(pid, "") + resumed.group(1)
        o = _OPEN.search(rest)
        if not o:
            continue
        path, flags, mode, _res, err = o.groups()
        rel = _rel(path, root)
        if rel is None:
            continue
        out.append((rel, _flags(flags.split("|")), mode, err or "ok"))
    return out


def model_entries(trace: Sequence[OpenEvent], root: str) -> list[Entry]:
    out: list[Entry] = []
    for ev in trace:
        rel = _rel(ev.path, root)
        if rel is None:
            continue
        mode = f"{ev.mode:04o}" if ev.flags & os.O_CREAT else None
        result = "ok" if ev.result >= 0 else errno.errorcode.get(-ev.result, str(ev.result))
        out.append((rel, _flags(ev.flag_names), mode, result))
    return out


def run_qemu(
    args: Sequence[str],
    commands: Sequence[tuple[str, dict[str, Any] | None]],
    root: str,
    *,
    machine: str = "none",
    timeout: float = 60.0,
) -> tuple[list[Entry], list[dict[str, Any]], str]:
    """Run stock QEMU under strace; return (image opens, QMP replies, stderr)."""
    ours, theirs = socket.socketpair()
    with tempfile.TemporaryDirectory(prefix="h5strace") as tmp:
        log = os.path.join(tmp, "strace.log")
        argv = [
            "strace", "-f", "-qq", "-e", "trace=openat,open", "-o", log,
            QEMU, "-nodefaults", "-display", "none", "-machine", machine, "-accel", "tcg",
            "-chardev", f"socket,id=mon,fd={theirs.fileno()}", "-mon", "chardev=mon,mode=control",
            *args,
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        theirs.close()
        replies: list[dict[str, Any]] = []
        qmp = QEMUMonitorProtocol(ours)
        try:
            qmp.connect()
            for name, arguments in commands:
                replies.append(dict(qmp.cmd_raw(name, arguments)))
            qmp.close()
        except Exception as err:  # QEMU refused the command line: its stderr says why
            replies.append({"error": repr(err)})
        try:
            _, err_text = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise TimeoutError(f"QEMU under strace did not exit within {timeout}s") from None
        with open(log) as f:
            return parse_strace(f.read(), root), replies, err_text.decode(errors="replace")
