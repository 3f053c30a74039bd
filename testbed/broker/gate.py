"""Deciding and performing one open on a peer's behalf.

How a request is opened, and why each step is there:

1. The path must be absolute (the broker cannot know the peer's cwd).
2. The longest grant covering the path that allows the needed access is
   chosen; the rest of the path is resolved *relative to the grant's root
   directory* with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`` and,
   unless the grant allows symlinks, ``RESOLVE_NO_SYMLINKS``.  ``..``,
   absolute symlinks, ``/proc/self/root`` tricks and the like therefore fail
   inside the kernel's path walk (``EXDEV``/``ELOOP``) instead of being
   caught (or missed) by string checks.
3. That one ``openat2`` is the open: the kernel resolves and opens in a
   single step, so a symlink swapped in after a check has nothing to
   redirect.  It adds ``O_NONBLOCK`` (a FIFO must not block the broker) and
   ``O_NOCTTY``, and leaves out ``O_TRUNC``.
4. The inode behind the new fd is then checked: device nodes, FIFOs and
   sockets, and regular files with more than one hard link (the other link
   may be outside the grant), are refused unless the grant allows them.
   Only after that is ``O_TRUNC`` applied (``ftruncate``) and
   ``O_NONBLOCK`` taken back off if the peer did not ask for it, so a
   refused open has changed nothing.  Device nodes in a grant can only be
   put there by whoever controls the granted directory (the broker creates
   regular files only), which is why opening one before refusing it is
   acceptable here.
5. ``O_CREAT`` passes through only under a create grant, with the mode
   masked (no setuid/setgid, not world-writable).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass

from testbed.broker.openat2 import (
    RESOLVE_BENEATH,
    RESOLVE_NO_MAGICLINKS,
    RESOLVE_NO_SYMLINKS,
    openat2,
)
from testbed.broker.policy import Access, Grant, Policy, needed_access
from testbed.protocol import InvalidRequest, OpenRequest

_O_PATH_FLAGS = os.O_PATH | os.O_CLOEXEC
#: Bits the broker does not pass on as asked: O_CLOEXEC on the peer's side
#: comes from the peer's recvmsg; O_TMPFILE files could not be audited by name.
_STRIP = os.O_CLOEXEC | (os.O_TMPFILE & ~os.O_DIRECTORY)
_RESOLVE_SYMLINKS = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
_RESOLVE_STRICT = _RESOLVE_SYMLINKS | RESOLVE_NO_SYMLINKS
#: Status flags F_SETFL can change.
_SETFL_BITS = os.O_APPEND | os.O_NONBLOCK | os.O_DIRECT | os.O_NOATIME | 0o20000  # FASYNC
_DEVICE_KINDS = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Outcome:
    """What the broker answers: ``fd`` when ``result == 0``, else ``-errno``."""

    result: int
    fd: int | None = None
    reason: str = ""


class Gate:
    """Opens requests under a :class:`Policy`, holding an ``O_PATH`` fd per grant root."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._roots: dict[Grant, int | None] = {}

    def close(self) -> None:
        for fd in self._roots.values():
            if fd is not None:
                os.close(fd)
        self._roots.clear()

    def _root(self, grant: Grant) -> int | None:
        """The directory grant's root dirfd, or None for a grant of a single file."""
        if grant in self._roots:
            return self._roots[grant]
        try:
            fd = os.open(grant.path, _O_PATH_FLAGS | os.O_DIRECTORY)
        except NotADirectoryError:
            self._roots[grant] = None
            return None
        except FileNotFoundError:
            return None  # maybe a file grant for a file not created yet: look again next time
        self._roots[grant] = fd
        return fd

    def refuse(self, reason: str) -> Outcome:
        return Outcome(result=-self.policy.refuse_errno, reason=reason)

    def handle(self, request: OpenRequest | InvalidRequest) -> Outcome:
        if isinstance(request, InvalidRequest):
            return Outcome(result=-request.errno, reason=request.reason)
        path = request.path_str
        if not path.startswith("/"):
            return self.refuse("relative path (the broker cannot know the peer's cwd)")
        if request.flags & os.O_PATH:
            return self.refuse("O_PATH descriptors are not handed out")
        need = needed_access(request.flags)
        strongest: Access | None = None
        for grant in self.policy.by_length:
            rest = grant.covers(path)
            if rest is None:
                continue
            if grant.access >= need:
                return self._open(grant, rest, request, need)
            strongest = max(strongest or grant.access, grant.access)
        if strongest is None:
            return self.refuse("not under any grant")
        return self.refuse(f"needs {need.label} access, the grant gives {strongest.label}")

    def _open(self, grant: Grant, rest: str, request: OpenRequest, need: Access) -> Outcome:
        try:
            root = self._root(grant)
        except OSError as err:
            return Outcome(result=-(err.errno or errno.EIO), reason=f"grant root: {err.strerror}")
        if root is None:
            # A grant of one file: resolve its last component from its parent,
            # which the administrator named and so is trusted.
            if rest:
                return self.refuse("beneath a file grant")
            try:
                parent = os.open(os.path.dirname(grant.path), _O_PATH_FLAGS | os.O_DIRECTORY)
            except OSError as err:
                return Outcome(result=-(err.errno or errno.EIO), reason=err.strerror or "")
            try:
                name = os.path.basename(grant.path)
                return self._open_beneath(parent, name, grant, request, need)
            finally:
                os.close(parent)
        return self._open_beneath(root, rest or ".", grant, request, need)

    def _open_beneath(
        self, root: int, target: str, grant: Grant, request: OpenRequest, need: Access
    ) -> Outcome:
        resolve = _RESOLVE_SYMLINKS if grant.symlinks else _RESOLVE_STRICT
        flags = request.flags
        if need is not Access.CREATE:
            flags &= ~os.O_CREAT
        # O_NONBLOCK: a FIFO must not block the broker while it is still
        # being checked; O_NOCTTY: a tty must not become our terminal.
        flags = (flags & ~(_STRIP | os.O_TRUNC)) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        mode = request.mode & self.policy.create_mode_mask
        try:
            fd = openat2(root, target, flags, mode, resolve)
        except OSError as err:
            return self._resolve_error(err)
        try:
            st = os.fstat(fd)
        except OSError as err:  # pragma: no cover - fstat on a fresh fd does not fail
            os.close(fd)
            return Outcome(result=-(err.errno or errno.EIO), reason=err.strerror or "")
        problem = self._check_inode(st, grant)
        if problem:
            os.close(fd)
            return self.refuse(problem)
        try:
            if request.flags & os.O_TRUNC and stat.S_ISREG(st.st_mode):
                os.ftruncate(fd, 0)
            if not request.flags & os.O_NONBLOCK:
                # One F_SETFL to the status flags the peer asked for, dropping
                # the O_NONBLOCK added above (cheaper than os.set_blocking).
                fcntl.fcntl(fd, fcntl.F_SETFL, request.flags & _SETFL_BITS)
        except OSError as err:
            os.close(fd)
            return Outcome(result=-(err.errno or errno.EIO), reason=err.strerror or "")
        return Outcome(result=0, fd=fd)

    def _resolve_error(self, err: OSError) -> Outcome:
        code = err.errno or errno.EIO
        if code == errno.EXDEV:
            return self.refuse("path escapes the grant")
        if code == errno.ELOOP:
            return self.refuse("path goes through a symlink the grant does not allow")
        return Outcome(result=-code, reason=err.strerror or "")

    def _check_inode(self, st: os.stat_result, grant: Grant) -> str | None:
        kind = stat.S_IFMT(st.st_mode)
        if kind in _DEVICE_KINDS and not grant.devices:
            return f"{_DEVICE_KINDS[kind]} and the grant does not allow devices"
        if kind == stat.S_IFREG and st.st_nlink > 1 and not grant.hardlinks:
            return f"a file with {st.st_nlink} hard links and the grant does not allow hardlinks"
        return None
