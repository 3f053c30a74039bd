"""Landlock rulesets through ctypes (Python has no binding).

The supervisor builds the ruleset in the parent (creating one confines
nobody) and the child only calls ``landlock_restrict_self`` on it before
``execve``.  The ruleset *handles* every file-system right the running ABI
knows, so whatever is not granted by a rule is denied: the image directories
get no rule at all, and a confined QEMU can reach its images only through
descriptors the supervisor opened (Landlock checks at open time, so those
carry their full rights).

What Landlock does not cover, and so neither does this: ``stat``,
``chmod``/``chown``, extended attributes, ``readlink``, and connecting to a
UNIX socket by path.

Reference: include/uapi/linux/landlock.h, Documentation/userspace-api/landlock.rst.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
from dataclasses import dataclass
from enum import IntFlag

from testbed.errors import KernelFeatureError
from testbed.supervise.seccomp import libc

SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1


class FS(IntFlag):
    """``LANDLOCK_ACCESS_FS_*``."""

    EXECUTE = 1 << 0
    WRITE_FILE = 1 << 1
    READ_FILE = 1 << 2
    READ_DIR = 1 << 3
    REMOVE_DIR = 1 << 4
    REMOVE_FILE = 1 << 5
    MAKE_CHAR = 1 << 6
    MAKE_DIR = 1 << 7
    MAKE_REG = 1 << 8
    MAKE_SOCK = 1 << 9
    MAKE_FIFO = 1 << 10
    MAKE_BLOCK = 1 << 11
    MAKE_SYM = 1 << 12
    REFER = 1 << 13  # ABI 2
    TRUNCATE = 1 << 14  # ABI 3
    IOCTL_DEV = 1 << 15  # ABI 5


#: Rights that mean something on a rule for a file (not a directory).
FILE_RIGHTS = FS.EXECUTE | FS.WRITE_FILE | FS.READ_FILE | FS.TRUNCATE | FS.IOCTL_DEV


def handled_for_abi(abi: int) -> FS:
    """Every file-system right ABI ``abi`` knows."""
    rights = FS((1 << 13) - 1)
    if abi >= 2:
        rights |= FS.REFER
    if abi >= 3:
        rights |= FS.TRUNCATE
    if abi >= 5:
        rights |= FS.IOCTL_DEV
    return rights


class _RulesetAttr(ctypes.Structure):
    _fields_ = (("handled_access_fs", ctypes.c_uint64),)


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


def _syscall(nr: int, *args: object) -> int:
    ret: int = libc().syscall(nr, *args)
    if ret < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return ret


def abi_version() -> int:
    """The running kernel's Landlock ABI; :class:`KernelFeatureError` if there is none."""
    try:
        return _syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    except OSError as err:
        why = {
            errno.ENOSYS: "not built into this kernel (CONFIG_SECURITY_LANDLOCK)",
            errno.EOPNOTSUPP: "built in but not enabled at boot (add landlock to lsm=)",
        }.get(err.errno or 0, err.strerror or "")
        raise KernelFeatureError(f"Landlock is unavailable: {why}", feature="landlock") from err


@dataclass(frozen=True, kw_only=True, slots=True)
class Rule:
    path: str
    access: FS


class Ruleset:
    """A Landlock ruleset fd being built; :meth:`restrict_self` is for the child."""

    def __init__(self, abi: int | None = None) -> None:
        self.abi = abi if abi is not None else abi_version()
        self.handled = handled_for_abi(self.abi)
        attr = _RulesetAttr(int(self.handled))
        self.fd = _syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0)
        self.rules: list[Rule] = []

    def allow(self, path: str, access: FS) -> bool:
        """Grant ``access`` beneath ``path``; False (and no rule) if ``path`` does not exist."""
        granted = add_rule(self.fd, path, access & self.handled)
        if granted is None:
            return False
        self.rules.append(Rule(path=path, access=granted))
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def add_rule(ruleset_fd: int, path: str, access: FS) -> FS | None:
    """Add a path-beneath rule; the rights it got (file rights only on a file), or
    None if ``path`` does not exist."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= FILE_RIGHTS
        attr = _PathBeneathAttr(int(access), fd)
        _syscall(
            SYS_LANDLOCK_ADD_RULE, ruleset_fd, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(attr), 0
        )
    finally:
        os.close(fd)
    return access


def restrict_self(ruleset_fd: int) -> None:
    """Confine the calling thread (and what it execs) to ``ruleset_fd``.  Needs no_new_privs."""
    _syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset_fd, 0)


_ELF_MAGIC = b"\x7fELF"
_PT_INTERP = 3


def elf_interpreter(path: str) -> str | None:
    """The program interpreter (``PT_INTERP``) of a 64-bit little-endian ELF file, if any."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != _ELF_MAGIC or head[4] != 2 or head[5] != 1:
                return None
            (phoff,) = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            for i in range(phnum):
                (p_type,) = struct.unpack_from("<I", table, i * phentsize)
                if p_type == _PT_INTERP:
                    (off,) = struct.unpack_from("<Q", table, i * phentsize + 8)
                    (size,) = struct.unpack_from("<Q", table, i * phentsize + 32)
                    f.seek(off)
                    return f.read(size).rstrip(b"\0").decode()
    except (OSError, struct.error, UnicodeDecodeError):
        return None
    return None
