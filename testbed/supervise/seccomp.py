"""seccomp(2) and the user-notification ioctls, through ctypes.

libseccomp's Python binding (python3-seccomp 2.5) has neither
``SECCOMP_IOCTL_NOTIF_ADDFD`` nor ``SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV``,
so the structures and ioctl numbers are declared here, from
``include/uapi/linux/seccomp.h``.  Every call raises ``OSError`` with the
errno, like ``os`` functions.  Nothing is loaded at import time.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from typing import Any

from testbed.errors import KernelFeatureError

SYS_SECCOMP = 317  # x86_64

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_ACTION_AVAIL = 2
SECCOMP_GET_NOTIF_SIZES = 3

SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5

SECCOMP_ADDFD_FLAG_SETFD = 1 << 0
SECCOMP_ADDFD_FLAG_SEND = 1 << 1

SECCOMP_RET_USER_NOTIF = 0x7FC00000

PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1


class SeccompData(ctypes.Structure):
    _fields_ = (
        ("nr", ctypes.c_int32),
        ("arch", ctypes.c_uint32),
        ("instruction_pointer", ctypes.c_uint64),
        ("args", ctypes.c_uint64 * 6),
    )


class SeccompNotif(ctypes.Structure):
    _fields_ = (
        ("id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("data", SeccompData),
    )


class SeccompNotifResp(ctypes.Structure):
    _fields_ = (
        ("id", ctypes.c_uint64),
        ("val", ctypes.c_int64),
        ("error", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
    )


class SeccompNotifAddfd(ctypes.Structure):
    _fields_ = (
        ("id", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("srcfd", ctypes.c_uint32),
        ("newfd", ctypes.c_uint32),
        ("newfd_flags", ctypes.c_uint32),
    )


class SeccompNotifSizes(ctypes.Structure):
    _fields_ = (
        ("seccomp_notif", ctypes.c_uint16),
        ("seccomp_notif_resp", ctypes.c_uint16),
        ("seccomp_data", ctypes.c_uint16),
    )


class SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def _ioc(direction: int, nr: int, size: int) -> int:
    # asm-generic/ioctl.h: dir << 30 | size << 16 | type << 8 | nr; type is '!'
    return (direction << 30) | (size << 16) | (ord("!") << 8) | nr


_IOC_WRITE, _IOC_READ = 1, 2
IOCTL_NOTIF_RECV = _ioc(_IOC_READ | _IOC_WRITE, 0, ctypes.sizeof(SeccompNotif))
IOCTL_NOTIF_SEND = _ioc(_IOC_READ | _IOC_WRITE, 1, ctypes.sizeof(SeccompNotifResp))
IOCTL_NOTIF_ID_VALID = _ioc(_IOC_WRITE, 2, 8)
IOCTL_NOTIF_ADDFD = _ioc(_IOC_WRITE, 3, ctypes.sizeof(SeccompNotifAddfd))


@functools.cache
def libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int) -> int:
    if ret < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return ret


def seccomp(operation: int, flags: int, arg: Any) -> int:
    return _check(libc().syscall(SYS_SECCOMP, operation, flags, arg))


def install_filter(program: bytes, flags: int) -> int:
    """Install ``program`` on the calling thread; the listener fd if one was asked for."""
    buf = ctypes.create_string_buffer(program, len(program))
    prog = SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    return seccomp(SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(prog))


def notif_sizes() -> SeccompNotifSizes:
    sizes = SeccompNotifSizes()
    seccomp(SECCOMP_GET_NOTIF_SIZES, 0, ctypes.byref(sizes))
    return sizes


def _ioctl(fd: int, request: int, arg: Any) -> int:
    return _check(libc().ioctl(fd, ctypes.c_ulong(request), arg))


class Listener:
    """The supervisor's end of a filter: receive, check, answer notifications."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        sizes = notif_sizes()
        # The kernel may know a longer struct than ours: give it room, read our part.
        self._recv_size = max(sizes.seccomp_notif, ctypes.sizeof(SeccompNotif))

    def recv(self) -> SeccompNotif:
        """The next notification (blocks; ENOENT when its caller vanished meanwhile)."""
        buf = ctypes.create_string_buffer(self._recv_size)  # must be zeroed
        _ioctl(self.fd, IOCTL_NOTIF_RECV, buf)
        return SeccompNotif.from_buffer_copy(buf.raw[: ctypes.sizeof(SeccompNotif)])

    def id_valid(self, notif_id: int) -> bool:
        """Whether the caller is still waiting (its TID was not reused meanwhile)."""
        try:
            _ioctl(self.fd, IOCTL_NOTIF_ID_VALID, ctypes.byref(ctypes.c_uint64(notif_id)))
        except OSError as err:
            if err.errno == errno.ENOENT:
                return False
            raise
        return True

    def reply(self, notif_id: int, *, val: int = 0, error: int = 0) -> None:
        """Answer: ``error`` is a negative errno (0 for success with ``val``)."""
        resp = SeccompNotifResp(notif_id, val, error, 0)
        _ioctl(self.fd, IOCTL_NOTIF_SEND, ctypes.byref(resp))

    def install_fd(self, notif_id: int, fd: int, *, cloexec: bool) -> int:
        """Install ``fd`` in the caller without answering; the caller's fd number."""
        addfd = SeccompNotifAddfd(notif_id, 0, fd, 0, os.O_CLOEXEC if cloexec else 0)
        return _ioctl(self.fd, IOCTL_NOTIF_ADDFD, ctypes.byref(addfd))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- what the kernel offers ----------------------------------------------------------------


def check_user_notification() -> None:
    """Raise :class:`KernelFeatureError` naming what this kernel lacks, if anything."""
    if os.uname().machine != "x86_64":
        raise KernelFeatureError(
            f"the supervisor's filter is written for x86_64, not {os.uname().machine}",
            feature="x86_64",
        )
    action = ctypes.c_uint32(SECCOMP_RET_USER_NOTIF)
    try:
        seccomp(SECCOMP_GET_ACTION_AVAIL, 0, ctypes.byref(action))
    except OSError as err:
        what = "seccomp(2)" if err.errno == errno.ENOSYS else "SECCOMP_RET_USER_NOTIF"
        raise KernelFeatureError(
            f"this kernel has no seccomp user notification ({what}: {err.strerror}); "
            "Linux 5.0 or later with CONFIG_SECCOMP_FILTER is needed",
            feature="seccomp user notification",
        ) from err
    # Flags are checked before the program is read: a NULL program gives EFAULT
    # when the kernel knows the flags and EINVAL when it does not.  No filter is
    # installed either way.
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    try:
        seccomp(SECCOMP_SET_MODE_FILTER, flags, None)
    except OSError as err:
        if err.errno == errno.EFAULT:
            return
        raise KernelFeatureError(
            "this kernel has no SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV "
            f"({err.strerror}); Linux 5.19 or later is needed (without it a signal "
            "makes an answered O_CREAT|O_EXCL open fail with EEXIST)",
            feature="SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
        ) from err
    raise KernelFeatureError(
        "seccomp accepted a NULL filter program: cannot tell what this kernel offers",
        feature="seccomp",
    )
