"""``openat2(2)`` through ctypes (Python has no wrapper for it).

Linux 5.6+; syscall number 437 on every architecture that has it.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

SYS_OPENAT2 = 437

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10


class OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


@functools.cache
def syscall() -> Any:
    """The ``syscall`` function with openat2's prototype (returns -1 on failure, errno kept)."""
    # Loaded on first use, not at import: no import-time side effects.  A
    # typed prototype keeps ctypes from guessing conversions on every call,
    # which is most of the cost of a call on the broker's hot path.
    libc = ctypes.CDLL(None, use_errno=True)
    proto = ctypes.CFUNCTYPE(
        ctypes.c_long,
        ctypes.c_long,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.POINTER(OpenHow),
        ctypes.c_size_t,
        use_errno=True,
    )
    return proto(("syscall", libc))


HOW_SIZE = ctypes.sizeof(OpenHow)
#: ``open_how`` structs by (flags, mode, resolve): the broker reuses a handful.
_HOWS: dict[tuple[int, int, int], OpenHow] = {}


def openat2(dirfd: int, path: str | bytes, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """Open ``path`` relative to ``dirfd``; raise ``OSError`` like ``os.open``."""
    raw = path if isinstance(path, bytes) else os.fsencode(path)
    key = (flags, mode if flags & (os.O_CREAT | os.O_TMPFILE) else 0, resolve)
    how = _HOWS.get(key)
    if how is None:
        how = OpenHow(*key)
        if len(_HOWS) < 1024:
            _HOWS[key] = how
    fd: int = syscall()(SYS_OPENAT2, dirfd, raw, how, HOW_SIZE)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(raw))
    return fd


def available() -> bool:
    """Whether the running kernel has openat2."""
    try:
        fd = openat2(-100, "/", os.O_PATH | os.O_CLOEXEC)  # AT_FDCWD
    except OSError:
        return False
    os.close(fd)
    return True
