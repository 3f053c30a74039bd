"""Reading what a notifying thread asked for: its memory and its ``/proc`` entries.

Every function takes the TID of the calling thread (a notification can come
from any thread of the supervised process, and threads may have their own
working directory after ``unshare(CLONE_FS)``).  Nothing here is trusted by
itself: the caller checks ``SECCOMP_IOCTL_NOTIF_ID_VALID`` after all of
these reads, because a TID can be reused once its thread is gone.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
from dataclasses import dataclass
from typing import Any

from testbed.errors import TargetError as TargetError  # re-exported: callers import it here
from testbed.supervise.seccomp import libc

PATH_MAX = 4096
AT_FDCWD = -100
OPEN_HOW_SIZE_VER0 = 24
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _IoVec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


@functools.cache
def _process_vm_readv() -> Any:
    fn = libc().process_vm_readv
    fn.argtypes = (
        ctypes.c_int,
        ctypes.POINTER(_IoVec),
        ctypes.c_ulong,
        ctypes.POINTER(_IoVec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    )
    fn.restype = ctypes.c_ssize_t
    return fn


def read_memory(tid: int, address: int, length: int) -> bytes:
    """Up to ``length`` bytes at ``address`` in ``tid``'s memory (short at an unmapped page)."""
    buf = ctypes.create_string_buffer(length)
    local = _IoVec(ctypes.cast(buf, ctypes.c_void_p), length)
    remote = _IoVec(address, length)
    got = _process_vm_readv()(tid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if got < 0:
        code = ctypes.get_errno()
        if code == errno.EFAULT:
            return b""
        if code == errno.ESRCH:
            raise TargetError(errno.ESRCH, "the calling thread is gone")
        raise TargetError(code, f"process_vm_readv: {os.strerror(code)}")
    return buf.raw[:got]


def read_path(tid: int, address: int) -> bytes:
    """The NUL-terminated path at ``address``, read page by page (a path may end
    just before an unmapped page)."""
    if address == 0:
        raise TargetError(errno.EFAULT, "NULL path")
    out = b""
    while len(out) < PATH_MAX:
        chunk_len = min(_PAGE - (address % _PAGE), PATH_MAX - len(out))
        chunk = read_memory(tid, address, chunk_len)
        nul = chunk.find(b"\0")
        if nul >= 0:
            return out + chunk[:nul]
        if len(chunk) < chunk_len:
            raise TargetError(errno.EFAULT, "path runs into unmapped memory")
        out += chunk
        address += chunk_len
    raise TargetError(errno.ENAMETOOLONG, f"path longer than {PATH_MAX - 1} bytes")


@dataclass(frozen=True, slots=True)
class OpenHow:
    flags: int
    mode: int
    resolve: int


def read_open_how(tid: int, address: int, size: int) -> OpenHow:
    """``struct open_how`` as openat2(2) reads it, with its size rules."""
    if size < OPEN_HOW_SIZE_VER0:
        raise TargetError(errno.EINVAL, f"open_how size {size} < {OPEN_HOW_SIZE_VER0}")
    if size > _PAGE:
        raise TargetError(errno.E2BIG, f"open_how size {size} > page size")
    raw = read_memory(tid, address, size)
    if len(raw) < size:
        raise TargetError(errno.EFAULT, "open_how runs into unmapped memory")
    if any(raw[OPEN_HOW_SIZE_VER0:]):
        raise TargetError(errno.E2BIG, "open_how has non-zero fields this supervisor does not know")
    flags, mode, resolve = struct.unpack_from("=QQQ", raw)
    return OpenHow(flags, mode, resolve)


@dataclass(frozen=True, slots=True)
class TaskStatus:
    tgid: int
    umask: int
    #: The real uid (what SO_PEERCRED would report for a socket it made).
    uid: int


def read_status(tid: int) -> TaskStatus:
    """Tgid, umask and uid of ``tid``, from ``/proc/TID/status``."""
    # os.open/os.read rather than open(): this runs for every open served
    try:
        fd = os.open(f"/proc/{tid}/status", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise TargetError(errno.ESRCH, "the calling thread is gone") from err
    try:
        text = os.read(fd, 8192)
    except ProcessLookupError as err:
        raise TargetError(errno.ESRCH, "the calling thread is gone") from err
    finally:
        os.close(fd)
    try:
        return TaskStatus(
            tgid=int(_field(text, b"\nTgid:")),
            umask=int(_field(text, b"\nUmask:"), 8),
            uid=int(_field(text, b"\nUid:").split()[0]),
        )
    except (TargetError, ValueError, IndexError) as err:
        # ValueError: int() of a malformed number
        raise TargetError(errno.EIO, f"/proc/{tid}/status has no Tgid, Umask or Uid") from err


def _field(text: bytes, key: bytes) -> bytes:
    start = text.find(key)
    if start < 0:
        raise TargetError(errno.EIO, f"no {key.decode(errors='replace').strip()} line")
    start += len(key)
    end = text.find(b"\n", start)
    return text[start : end if end >= 0 else len(text)].strip()


def _readlink(link: str, *, missing: int, what: str) -> str:
    try:
        return os.readlink(link)
    except FileNotFoundError as err:
        raise TargetError(missing, f"{what} is not open") from err
    except OSError as err:
        raise TargetError(err.errno or errno.EIO, f"{what}: {err.strerror}") from err


def directory_of(tid: int, dirfd: int) -> str:
    """The directory a relative name is resolved against: the thread's cwd or ``dirfd``."""
    if dirfd == AT_FDCWD:
        where = _readlink(f"/proc/{tid}/cwd", missing=errno.ESRCH, what="the working directory")
    else:
        if dirfd < 0:
            raise TargetError(errno.EBADF, f"dirfd {dirfd}")
        where = _readlink(f"/proc/{tid}/fd/{dirfd}", missing=errno.EBADF, what=f"dirfd {dirfd}")
    if not where.startswith("/"):
        # a socket, pipe or anonymous inode: openat answers ENOTDIR
        raise TargetError(errno.ENOTDIR, f"dirfd {dirfd} is {where}, not a directory")
    if where.endswith(" (deleted)"):
        raise TargetError(errno.ENOENT, f"{where[: -len(' (deleted)')]} was deleted")
    return where


def root_of(tid: int) -> str:
    """The thread's root directory as the supervisor sees it ("/" unless it chrooted)."""
    return _readlink(f"/proc/{tid}/root", missing=errno.ESRCH, what="the root directory")


def rewrite_proc_self(path: str, *, tgid: int, tid: int) -> str:
    """``/proc/self`` and ``/proc/thread-self`` as the caller means them.

    The supervisor opens the file, so left alone they would name the
    supervisor.  ``path`` is absolute and normalised.
    """
    for name, real in (
        ("/proc/self", f"/proc/{tgid}"),
        ("/proc/thread-self", f"/proc/{tgid}/task/{tid}"),
    ):
        if path == name or path.startswith(name + "/"):
            return real + path[len(name) :]
    return path


def normalise(path: str) -> str:
    """Collapse ``//`` and ``/./`` but keep ``..`` (only the kernel can resolve it)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    out = "/" + "/".join(parts)
    # "file/" must still fail with ENOTDIR, as the kernel answers it
    return out + "/" if path.endswith("/") and parts else out
