"""inotify through ctypes: did anybody *open* these inodes (not just look them up)?

An ``O_PATH`` lookup generates no event, a real open (for reading, writing,
of a FIFO or a device node) generates ``IN_OPEN`` on the inode, whoever
opened it.  The broker's tests watch what must not be opened: files outside
the grants, FIFOs and device nodes inside them.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

IN_OPEN = 0x20
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")


class OpenWatch:
    """Collects ``IN_OPEN`` events for a set of paths (files, FIFOs, device nodes)."""

    def __init__(self, *paths: str | Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._libc = libc
        self._fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._names: dict[int, str] = {}
        for path in paths:
            wd = libc.inotify_add_watch(self._fd, os.fsencode(str(path)), IN_OPEN)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
            self._names[wd] = str(path)

    def opened(self) -> list[str]:
        """The watched paths opened since the last call (one entry per open)."""
        seen: list[str] = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return seen
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + length
                if mask & IN_OPEN:
                    seen.append(self._names.get(wd, f"wd {wd}"))

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> OpenWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
