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
3. The target is first opened ``O_PATH``: that pins the inode, so its type
   and link count are checked on the very object that is then reopened
   (through ``/proc/self/fd``) with the requested flags.  A symlink swapped
   in after the check cannot redirect the open, and a FIFO or device node is
   refused before anything opens it for real (which could block or have
   side effects).
4. A create (``O_CREAT`` of a missing file) is one ``openat2`` with the same
   resolve flags and the mode masked; ``O_NONBLOCK`` keeps a FIFO planted in
   the race window from blocking the broker, and the type is checked after.
"""

from __future__ import annotations

import errno
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
#: Bits the broker never passes on: it decides creation itself, and
#: O_CLOEXEC on the peer's side is set by the peer's recvmsg.
_STRIP_ON_REOPEN = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_TMPFILE | os.O_CLOEXEC
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
        covering = self.policy.covering(path)
        if not covering:
            return self.refuse("not under any grant")
        for grant, rest in covering:
            if grant.access >= need:
                return self._open(grant, rest, request, need)
        strongest = max(g.access for g, _ in covering)
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
        resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
        if not grant.symlinks:
            resolve |= RESOLVE_NO_SYMLINKS
        try:
            pfd = openat2(root, target, _O_PATH_FLAGS, 0, resolve)
        except OSError as err:
            if err.errno == errno.ENOENT and need is Access.CREATE and request.flags & os.O_CREAT:
                return self._create(root, target, resolve, grant, request)
            return self._resolve_error(err)
        if request.flags & os.O_CREAT and request.flags & os.O_EXCL:
            os.close(pfd)
            return Outcome(result=-errno.EEXIST, reason="O_EXCL and the file exists")
        return self._reopen_checked(pfd, grant, request)

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

    def _reopen_checked(self, pfd: int, grant: Grant, request: OpenRequest) -> Outcome:
        try:
            st = os.fstat(pfd)
            problem = self._check_inode(st, grant)
            if problem:
                return self.refuse(problem)
            flags = (request.flags & ~_STRIP_ON_REOPEN) | os.O_CLOEXEC | os.O_NOCTTY
            special = not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode))
            if special:
                flags |= os.O_NONBLOCK
            try:
                fd = os.open(f"/proc/self/fd/{pfd}", flags)
            except OSError as err:
                return Outcome(result=-(err.errno or errno.EIO), reason=err.strerror or "")
            if special and not request.flags & os.O_NONBLOCK:
                os.set_blocking(fd, True)
            return Outcome(result=0, fd=fd)
        finally:
            os.close(pfd)

    def _create(
        self, root: int, target: str, resolve: int, grant: Grant, request: OpenRequest
    ) -> Outcome:
        mode = request.mode & self.policy.create_mode_mask
        flags = (
            request.flags & ~(os.O_CLOEXEC | os.O_NOFOLLOW)
            | os.O_CLOEXEC
            | os.O_NOCTTY
            | os.O_NONBLOCK
        )
        try:
            fd = openat2(root, target, flags, mode, resolve)
        except OSError as err:
            return self._resolve_error(err)
        st = os.fstat(fd)
        problem = self._check_inode(st, grant)
        if problem:
            os.close(fd)
            return self.refuse(problem)
        if not request.flags & os.O_NONBLOCK:
            os.set_blocking(fd, True)
        return Outcome(result=0, fd=fd)
