"""Deciding and performing one open on a peer's behalf.

The broker decides on the *inode* before anything is opened for reading or
writing, because opening some inodes is already an effect: a FIFO's blocked
writer wakes up, a character device's driver runs, a directory fd lets the
peer walk out of every grant with ``openat(fd, "..")``.  So an open goes:

1. The path must be absolute (the broker cannot know the peer's cwd);
   ``O_PATH`` is never handed out; ``O_TMPFILE`` gets ``-EINVAL`` where
   open(2) would say so and is refused otherwise (an unnamed file has no
   name to audit, and it is created in a directory).
2. The longest grant covering the path that allows the needed access is
   chosen, and the rest of the path is resolved *beneath the grant's root
   directory* with ``openat2(O_PATH, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
   [| RESOLVE_NO_SYMLINKS] [| RESOLVE_NO_XDEV])``: ``..``, symlinks, mount
   points and ``/proc`` tricks fail inside the kernel's path walk instead of
   being caught (or missed) by string checks.  An ``O_PATH`` open reads
   nothing and has no side effect on any kind of inode.
3. The inode behind that ``O_PATH`` fd is checked (``fstat``): directories,
   device nodes, FIFOs, sockets and regular files with several links are
   refused unless the grant's rule allows them.
4. Only then is *that inode* opened with the peer's flags, through
   ``/proc/self/fd/N`` (which names the inode, not a path that could be
   swapped), and the new fd is checked to be the same ``(st_dev, st_ino)``.
5. ``O_CREAT``: an existing file goes through 2-4; a missing one is created
   with ``O_CREAT | O_EXCL`` beneath the grant, which never follows a symlink
   and always makes a new regular file.  A name that exists but does not
   resolve (a dangling symlink) is refused rather than created through.
   The mode is masked (no setuid/setgid, not world-writable).

With ``symlinks`` allowed, the kernel follows relative symlinks beneath the
grant; an absolute one (which ``RESOLVE_BENEATH`` rejects) sends the path
through :meth:`Gate._walk`, which resolves it hop by hop: at most 40 hops
(the kernel's limit), every hop beneath a grant that allows the access, no
``..`` above a grant's root, magic links read as plain text.

**The fast path.**  Steps 1-2 (string checks, the grant, the flags to use)
are a pure function of the policy and the request's bytes, so once a request
was answered with a descriptor, :meth:`Gate.remember` keeps its
:class:`Decision` under the request frame's bytes, and :meth:`Gate.open_decided`
replays it: the kernel still resolves the name beneath the grant's root
(step 2's ``openat2``), the inode is still checked (3) and reopened and
compared (4), on every request.  Only a regular file with one link is
answered there (what every grant allows); anything else, any failure, and
every request not remembered go the general way, which decides from
scratch.  Never remembered: refusals and failures, ``O_CREAT``, ``O_TRUNC``,
``O_PATH``, ``O_TMPFILE``, relative names, file grants, grants allowing
devices or hard links, names over ``FAST_NAME_MAX`` bytes.  At most
``FAST_ENTRIES`` decisions are kept (the oldest is forgotten first); they
belong to the gate, whose policy cannot change, and are dropped with its
root descriptors on :meth:`Gate.close`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
from dataclasses import dataclass
from typing import NamedTuple

from testbed.broker.openat2 import (
    HOW_SIZE,
    RESOLVE_BENEATH,
    RESOLVE_NO_MAGICLINKS,
    RESOLVE_NO_SYMLINKS,
    RESOLVE_NO_XDEV,
    SYS_OPENAT2,
    OpenHow,
    openat2,
    syscall,
)
from testbed.broker.policy import Access, Grant, Policy, needed_access
from testbed.protocol import InvalidRequest, OpenRequest, encode_request

MAXSYMLINKS = 40  # the kernel's limit on symlinks followed in one lookup
_O_TMPFILE_BIT = os.O_TMPFILE & ~os.O_DIRECTORY
_PATH_FLAGS = os.O_PATH | os.O_CLOEXEC
#: Bits openat2 accepts (it refuses any other with EINVAL, open(2) ignores them).
_KNOWN_FLAGS = (
    os.O_ACCMODE
    | os.O_CREAT
    | os.O_EXCL
    | os.O_NOCTTY
    | os.O_TRUNC
    | os.O_APPEND
    | os.O_NONBLOCK
    | os.O_DSYNC
    | 0o20000  # FASYNC
    | os.O_DIRECT
    | 0o100000  # O_LARGEFILE
    | os.O_DIRECTORY
    | os.O_NOFOLLOW
    | os.O_NOATIME
    | os.O_CLOEXEC
    | os.O_SYNC
)
#: What the reopen of a checked inode leaves out of the peer's flags.  No
#: O_NOFOLLOW: /proc/self/fd/N is itself a (magic) link.
_REOPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | _O_TMPFILE_BIT
#: Status flags F_SETFL can change.
_SETFL_BITS = os.O_APPEND | os.O_NONBLOCK | os.O_DIRECT | os.O_NOATIME | 0o20000  # FASYNC
_DEVICE_KINDS = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}
#: How often a create retries when the name appears and vanishes under it.
_CREATE_TRIES = 3
#: The most decisions a gate remembers for its fast path.
FAST_ENTRIES = 256
#: The longest name (bytes) a decision is remembered for: QEMU's image paths
#: are far shorter, and it bounds the memory a peer can make the cache hold.
FAST_NAME_MAX = 256
#: Flags whose requests are never remembered: they create, truncate or
#: hand out what the fast path does not (O_PATH, O_TMPFILE).
_NOT_FAST = os.O_CREAT | os.O_TRUNC | os.O_PATH | _O_TMPFILE_BIT
_S_IFMT = 0o170000
_S_IFREG = stat.S_IFREG


#: How many forks this process is from the one that imported this module:
#: compared instead of os.getpid(), which is a system call per request.
_forks = [0]
_watching_forks: list[bool] = []


def _watch_forks() -> None:
    # Registered on the first Gate, not at import (no import-time effects).
    if not _watching_forks:
        _watching_forks.append(True)
        os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))


@dataclass(frozen=True, kw_only=True, slots=True)
class Outcome:
    """What the broker answers: ``fd`` when ``result == 0``, else ``-errno``."""

    result: int
    fd: int | None = None
    reason: str = ""

    @classmethod
    def failed(cls, err: OSError, reason: str | None = None) -> Outcome:
        """The answer for a failed call: its errno (EIO if it has none) and ``reason``,
        by default the errno's text."""
        return cls(
            result=-(err.errno or errno.EIO),
            reason=(err.strerror or "") if reason is None else reason,
        )


class _Refused(Exception):  # not in errors.py: it never escapes this module
    """A refusal (or, with ``code``, an errno) found deep in a path walk.

    Control flow only: every raise is caught in this module and turned into an
    :class:`Outcome`, so it is not part of ``testbed.errors``' tree.
    """

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class Decision(NamedTuple):
    """What the fast path replays for one request frame.

    A pure function of the policy and the request's bytes: nothing in it
    depends on the file system (the root dirfd is the gate's own, held from
    first use to :meth:`Gate.close`).  A tuple, because the fast path
    unpacks it on every request.
    """

    #: The grant root's ``O_PATH`` dirfd.
    root: int
    #: The name resolved beneath it.
    name: bytes
    #: The ``O_PATH`` open's ``open_how`` (with the grant's resolve bits).
    how: OpenHow
    #: The flags of the reopen through ``/proc/self/fd``.
    reopen: int
    #: The request decided (the audit record is made from it).
    request: OpenRequest


@dataclass(slots=True)
class _Base:
    """Where a path is resolved from: a grant's root, or a file grant's parent."""

    grant: Grant
    fd: int
    owned: bool  # a file grant's parent, opened for this request: close it
    resolve: int


def resolve_flags(grant: Grant) -> int:
    """The openat2 ``resolve`` bits a grant's rules call for."""
    flags = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
    if not grant.symlinks:
        flags |= RESOLVE_NO_SYMLINKS
    if not grant.cross_mounts:
        flags |= RESOLVE_NO_XDEV
    return flags


class Gate:
    """Opens requests under a :class:`Policy`, holding an ``O_PATH`` fd per grant root.

    :meth:`handle` is the whole interface: a decoded request in, an
    :class:`Outcome` out (the caller owns ``outcome.fd``).  It never raises
    for anything a peer can send.
    """

    def __init__(self, policy: Policy, *, may_block: bool = False) -> None:
        self._policy = policy
        #: Open an allowed FIFO as the peer asked, blocking until its other
        #: end opens as open(2) would: only for a caller that serves each open
        #: in a thread of its own (the supervisor).  The broker's one loop
        #: must never block, so by default a FIFO is opened O_NONBLOCK (a
        #: writer with no reader gets ENXIO, a reader may read EOF at once).
        self._may_block = may_block
        #: thread id -> the O_PATH fd of the FIFO it is blocked opening
        self._blocked: dict[int, int] = {}
        self._blocked_lock = threading.Lock()
        self._roots: dict[Grant, int | None] = {}
        self._resolve = {g: resolve_flags(g) for g in policy.grants}
        #: (fork generation, dirfd of /proc/self/fd): a forked child must not
        #: reuse its parent's, which names the parent's descriptors.
        self._proc_fd: tuple[int, int] | None = None
        #: request frame -> its decision (the fast path); see the module's docstring
        self.decisions: dict[bytes, Decision] = {}
        self._call = syscall()
        _watch_forks()

    @property
    def policy(self) -> Policy:
        """The policy, fixed for the gate's life (its decisions depend on it)."""
        return self._policy

    def close(self) -> None:
        # The decisions name root fds about to be closed (and maybe reused).
        self.decisions.clear()
        for fd in self._roots.values():
            if fd is not None:
                os.close(fd)
        self._roots.clear()
        if self._proc_fd is not None:
            os.close(self._proc_fd[1])
            self._proc_fd = None

    def _proc_fds(self) -> int:
        """A dirfd of this process's /proc/self/fd, to reopen checked inodes through."""
        generation = _forks[0]
        if self._proc_fd is None or self._proc_fd[0] != generation:
            if self._proc_fd is not None:
                os.close(self._proc_fd[1])
            self._proc_fd = (generation, os.open("/proc/self/fd", _PATH_FLAGS | os.O_DIRECTORY))
        return self._proc_fd[1]

    def _root(self, grant: Grant) -> int | None:
        """The directory grant's root dirfd, or None for a grant of a single file."""
        if grant in self._roots:
            return self._roots[grant]
        try:
            fd = os.open(grant.path, _PATH_FLAGS | os.O_DIRECTORY)
        except NotADirectoryError:
            self._roots[grant] = None
            return None
        except FileNotFoundError:
            return None  # maybe a file grant for a file not created yet: look again next time
        self._roots[grant] = fd
        return fd

    def refuse(self, reason: str) -> Outcome:
        return Outcome(result=-self.policy.refuse_errno, reason=reason)

    # -- deciding ----------------------------------------------------------

    def handle(self, request: OpenRequest | InvalidRequest) -> Outcome:
        """Decide ``request`` and, if it is allowed, open it."""
        if isinstance(request, InvalidRequest):
            return Outcome(result=-request.errno, reason=request.reason)
        path = request.path_str
        if not path.startswith("/"):
            return self.refuse("relative path (the broker cannot know the peer's cwd)")
        flags = request.flags
        if flags & os.O_PATH:
            return self.refuse("O_PATH descriptors are not handed out")
        if flags & _O_TMPFILE_BIT:
            return self._tmpfile(flags)
        need = needed_access(flags)
        try:
            grant, rest = self._select(path, need)
        except _Refused as refused:
            return self.refuse(refused.reason)
        return self._open(grant, rest, path.endswith("/"), request, need)

    def _select(self, path: str, need: Access) -> tuple[Grant, str]:
        """The longest grant covering ``path`` that allows ``need``, and the rest."""
        strongest: Access | None = None
        for grant in self.policy.by_length:
            rest = grant.covers(path)
            if rest is None:
                continue
            if grant.access >= need:
                return grant, rest
            strongest = max(strongest or grant.access, grant.access)
        if strongest is None:
            raise _Refused("not under any grant")
        raise _Refused(f"needs {need.label} access, the grant gives {strongest.label}")

    def _tmpfile(self, flags: int) -> Outcome:
        # The checks of the kernel's build_open_flags(), in its order.
        if flags & (os.O_TMPFILE | os.O_CREAT) != os.O_TMPFILE:
            return Outcome(result=-errno.EINVAL, reason="O_TMPFILE needs O_DIRECTORY, no O_CREAT")
        if flags & os.O_ACCMODE == os.O_RDONLY:
            return Outcome(result=-errno.EINVAL, reason="O_TMPFILE needs write access")
        return self.refuse("O_TMPFILE (an unnamed file in a directory) is not handed out")

    def _base(self, grant: Grant, rest: str, slash: bool) -> tuple[_Base, str]:
        """Where to resolve ``rest`` beneath ``grant`` from, and the name to resolve."""
        root = self._root(grant)
        if root is not None:
            return _Base(grant, root, False, self._resolve[grant]), rest or "."
        # A grant of one file: resolve its last component from its parent,
        # which the administrator named and so is trusted.
        if rest:
            raise _Refused("beneath a file grant")
        parent = os.open(os.path.dirname(grant.path), _PATH_FLAGS | os.O_DIRECTORY)
        name = os.path.basename(grant.path)
        # "FILE/" must still be ENOTDIR, as open(2) answers it.
        return _Base(grant, parent, True, self._resolve[grant]), name + "/" if slash else name

    def _open(
        self, grant: Grant, rest: str, slash: bool, request: OpenRequest, need: Access
    ) -> Outcome:
        flags = request.flags
        root = self._roots.get(grant)
        if root is not None and not flags & os.O_CREAT:
            # The common case, in one openat2: anything else (an error, a
            # symlink to walk) goes the long way below, which answers it.
            try:
                opath = openat2(
                    root,
                    rest or ".",
                    _PATH_FLAGS | (flags & (os.O_DIRECTORY | os.O_NOFOLLOW)),
                    0,
                    self._resolve[grant],
                )
            except OSError:
                pass
            else:
                return self._reopen(opath, grant, flags)
        try:
            base, target = self._base(grant, rest, slash)
        except _Refused as refused:
            return self.refuse(refused.reason)
        except OSError as err:
            return Outcome.failed(err, f"grant root: {err.strerror}")
        try:
            return self._open_beneath(base, target, request, need)
        except _Refused as refused:
            if refused.code is not None:
                return Outcome(result=-refused.code, reason=refused.reason)
            return self.refuse(refused.reason)
        except OSError as err:  # a grant root or file grant's parent met on a walk
            return Outcome.failed(err, f"grant: {err.strerror}")
        finally:
            if base.owned:
                os.close(base.fd)

    def _open_beneath(
        self, base: _Base, target: str, request: OpenRequest, need: Access
    ) -> Outcome:
        flags = request.flags
        creating = bool(flags & os.O_CREAT)
        exclusive = creating and bool(flags & os.O_EXCL)
        path_flags = _PATH_FLAGS | (flags & (os.O_DIRECTORY | os.O_NOFOLLOW))
        walked: list[_Base] = []
        try:
            for _ in range(_CREATE_TRIES):
                if not exclusive:
                    try:
                        opath = openat2(base.fd, target, path_flags, 0, base.resolve)
                    except OSError as err:
                        if self._needs_walk(err, base, walked):
                            base, target = self._walk(base, target, flags, need, walked)
                            continue
                        if not (creating and err.errno == errno.ENOENT):
                            return self._resolve_error(err, base, target, path_flags)
                    else:
                        return self._reopen(opath, base.grant, flags)
                try:
                    fd = openat2(
                        base.fd,
                        target,
                        self._create_flags(flags),
                        self._mode(request),
                        base.resolve,
                    )
                except OSError as err:
                    if err.errno == errno.EEXIST and not exclusive:
                        continue  # created meanwhile, or a dangling symlink: look again
                    if self._needs_walk(err, base, walked):
                        base, target = self._walk(base, target, flags, need, walked)
                        continue
                    return self._resolve_error(err, base, target, path_flags)
                return self._created(fd)
            return self.refuse(
                "the name exists but does not resolve (a dangling symlink is not created through)"
            )
        finally:
            for hop in walked:
                if hop.owned:
                    os.close(hop.fd)

    def _mode(self, request: OpenRequest) -> int:
        return request.mode & self.policy.create_mode_mask

    @staticmethod
    def _create_flags(flags: int) -> int:
        return (flags & _KNOWN_FLAGS) | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOCTTY

    @staticmethod
    def _needs_walk(err: OSError, base: _Base, walked: list[_Base]) -> bool:
        """Whether the kernel's walk stopped at something a hand walk may follow."""
        return base.grant.symlinks and not walked and err.errno in (errno.EXDEV, errno.ELOOP)

    def _reopen(self, opath: int, grant: Grant, flags: int) -> Outcome:
        """Check the inode behind ``opath``, then open it with the peer's flags."""
        try:
            st = os.fstat(opath)
            kind = stat.S_IFMT(st.st_mode)
            extra = os.O_NOCTTY
            if kind == stat.S_IFREG:
                if st.st_nlink > 1 and not grant.hardlinks:
                    links = st.st_nlink
                    return self.refuse(
                        f"a file with {links} hard links and the grant does not allow hardlinks"
                    )
            elif kind == stat.S_IFDIR:
                if not grant.directories:
                    return self.refuse("a directory and the grant does not allow directories")
            elif kind == stat.S_IFLNK:  # O_NOFOLLOW on a symlink: what open(2) answers
                return Outcome(result=-errno.ELOOP, reason="O_NOFOLLOW and the name is a symlink")
            elif not grant.devices:
                return self.refuse(f"{_DEVICE_KINDS[kind]} and the grant does not allow devices")
            elif not (self._may_block and kind == stat.S_IFIFO):
                extra |= os.O_NONBLOCK  # an allowed FIFO or tty must not block the broker
            proc = self._proc_fd
            if proc is None or proc[0] != _forks[0]:
                proc = (0, self._proc_fds())
            # unknown bits (any u32 a peer sends) are dropped, as open(2) ignores them
            how = (flags & _KNOWN_FLAGS & ~_REOPEN_DROP) | extra
            if kind == stat.S_IFIFO and not how & os.O_NONBLOCK:
                fd = self._open_blocking(opath, how, proc[1])
            else:
                fd = os.open(str(opath), how, dir_fd=proc[1])
        except OSError as err:
            return Outcome.failed(err)
        finally:
            os.close(opath)
        try:
            now = os.fstat(fd)
            if now.st_ino != st.st_ino or now.st_dev != st.st_dev:
                os.close(fd)
                return self.refuse("the inode opened is not the one checked")
            if extra & os.O_NONBLOCK and not flags & os.O_NONBLOCK:
                # One F_SETFL to the status flags the peer asked for, dropping
                # the O_NONBLOCK added above.
                fcntl.fcntl(fd, fcntl.F_SETFL, flags & _SETFL_BITS)
        except OSError as err:
            os.close(fd)
            return Outcome.failed(err)
        return Outcome(result=0, fd=fd)

    def _open_blocking(self, opath: int, how: int, proc: int) -> int:
        """Open a FIFO and wait for its other end, where :meth:`release_blocked` can see it."""
        me = threading.get_ident()
        with self._blocked_lock:
            self._blocked[me] = opath
        try:
            return os.open(str(opath), how, dir_fd=proc)
        finally:
            with self._blocked_lock:  # before the caller closes opath (its number is reused)
                del self._blocked[me]

    def release_blocked(self) -> int:
        """Wake every thread blocked opening a FIFO; how many there were.

        Opening the FIFO ``O_RDWR | O_NONBLOCK`` ourselves (which never blocks)
        is the other end its opener waits for; we close ours at once.  A
        supervisor shutting down calls this, or its workers would wait for
        a peer that may never come.
        """
        with self._blocked_lock:
            for opath in self._blocked.values():
                with contextlib.suppress(OSError):
                    os.close(os.open(f"/proc/self/fd/{opath}", os.O_RDWR | os.O_NONBLOCK))
            return len(self._blocked)

    def _created(self, fd: int) -> Outcome:
        """``fd`` if a create made a new regular file (O_CREAT | O_EXCL always does)."""
        try:
            st = os.fstat(fd)
        except OSError as err:
            os.close(fd)
            return Outcome.failed(err)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            return self.refuse("a create did not make a new regular file")
        return Outcome(result=0, fd=fd)

    # -- the fast path -----------------------------------------------------

    def decide(self, request: OpenRequest) -> Decision | None:
        """What the fast path may replay for ``request``, or None: the general way.

        Depends on the policy and the request alone (and on which grant
        roots are open, which only ever grows): the same checks, in the same
        order, as :meth:`handle` and :meth:`_open` make before the kernel is asked.
        """
        flags = request.flags
        if flags & _NOT_FAST or len(request.path) > FAST_NAME_MAX:
            return None
        path = request.path_str
        if not path.startswith("/"):
            return None
        try:
            grant, rest = self._select(path, needed_access(flags))
        except _Refused:
            return None
        root = self._roots.get(grant)
        if root is None or grant.devices or grant.hardlinks:
            return None
        how = OpenHow(
            _PATH_FLAGS | (flags & (os.O_DIRECTORY | os.O_NOFOLLOW)), 0, self._resolve[grant]
        )
        reopen = (flags & _KNOWN_FLAGS & ~_REOPEN_DROP) | os.O_NOCTTY
        return Decision(root, os.fsencode(rest or "."), how, reopen, request)

    def remember(self, request: OpenRequest, outcome: Outcome) -> None:
        """Keep ``request``'s decision for the fast path, if it may have one.

        Only when ``outcome`` (:meth:`handle`'s answer to ``request``) is a
        descriptor: refusals and failures are never remembered.  At most
        ``FAST_ENTRIES`` are kept: the oldest is forgotten first.
        """
        if outcome.fd is None:
            return
        decision = self.decide(request)
        if decision is None:
            return
        decisions = self.decisions
        # Keyed by the request's exact bytes on the wire: a frame that
        # differs in any byte (flags, mode, name) is a different key.
        frame = encode_request(request.path, request.flags, request.mode)
        if frame not in decisions and len(decisions) >= FAST_ENTRIES:
            del decisions[next(iter(decisions))]
        decisions[frame] = decision

    def open_decided(self, decision: Decision) -> int:
        """Replay ``decision``: the descriptor :meth:`handle` would answer, or -1.

        -1 means nothing was answered (the name did not resolve, the inode is
        not a regular file with one link, a call failed): the caller sends
        the request the general way, which decides it from scratch.  Nothing
        was opened for I/O unless the inode was a regular file.
        """
        root, name, how, reopen, _ = decision
        opath: int = self._call(SYS_OPENAT2, root, name, how, HOW_SIZE)
        if opath < 0:
            return -1
        try:
            st = os.fstat(opath)
            if st.st_mode & _S_IFMT != _S_IFREG or st.st_nlink != 1:
                return -1
            proc = self._proc_fd
            if proc is None or proc[0] != _forks[0]:
                proc = (0, self._proc_fds())
            fd = os.open(str(opath), reopen, dir_fd=proc[1])
        except OSError:
            return -1
        finally:
            os.close(opath)
        try:
            now = os.fstat(fd)
        except OSError:
            os.close(fd)
            return -1
        if now.st_ino != st.st_ino or now.st_dev != st.st_dev:
            os.close(fd)  # the general way refuses it, with its reason
            return -1
        return fd

    # -- refusals and the slow paths ---------------------------------------

    def _resolve_error(self, err: OSError, base: _Base, target: str, path_flags: int) -> Outcome:
        code = err.errno or errno.EIO
        grant = base.grant
        if code == errno.EXDEV:
            if base.resolve & RESOLVE_NO_XDEV and self._resolves_across_mounts(
                base, target, path_flags
            ):
                return self.refuse(
                    "path crosses a mount point and the grant does not allow cross_mounts"
                )
            return self.refuse("path escapes the grant")
        if code == errno.ELOOP:
            if not grant.symlinks:
                return self.refuse(
                    "path goes through a symlink and the grant does not allow symlinks"
                )
            if base.resolve & RESOLVE_NO_SYMLINKS:  # after a hand walk: the path changed
                return self.refuse("a symlink appeared in the path while it was resolved")
        return Outcome(result=-code, reason=err.strerror or "")

    @staticmethod
    def _resolves_across_mounts(base: _Base, target: str, path_flags: int) -> bool:
        """Whether ``target`` stays beneath the grant once mount crossings are allowed."""
        try:
            fd = openat2(base.fd, target, path_flags, 0, base.resolve & ~RESOLVE_NO_XDEV)
        except OSError as err:
            return err.errno != errno.EXDEV
        os.close(fd)
        return True

    @staticmethod
    def _walk_error(err: OSError) -> _Refused:
        code = err.errno or errno.EIO
        if code == errno.EXDEV:
            return _Refused("path crosses a mount point and the grant does not allow cross_mounts")
        if code == errno.ELOOP:
            return _Refused("a symlink appeared in the path while it was resolved")
        return _Refused(err.strerror or "", code)

    def _walk(
        self, base: _Base, target: str, flags: int, need: Access, walked: list[_Base]
    ) -> tuple[_Base, str]:
        """Resolve every symlink in ``target`` by hand; return a symlink-free place.

        Each component is looked at with ``O_PATH | O_NOFOLLOW`` under the
        strictest resolve flags (so nothing changes between looks without
        being noticed); a relative link is spliced into the rest of the path,
        an absolute one starts over beneath the grant that covers it.  The
        result is resolved again by the caller with ``RESOLVE_NO_SYMLINKS``:
        a symlink swapped in meanwhile fails there.

        Long because it is one loop over the path's components whose invariants
        (the base it stands on, the bases walked, the links followed) are checked on every
        turn; split, a piece could resolve a component outside those checks.
        """
        creating = bool(flags & os.O_CREAT)
        # O_CREAT | O_EXCL never follows a last symlink (open(2) says EEXIST).
        follow_last = not flags & os.O_NOFOLLOW and not (creating and flags & os.O_EXCL)
        trailing = target.endswith("/")
        through_last_link = False
        base = _Base(base.grant, base.fd, False, base.resolve | RESOLVE_NO_SYMLINKS)
        walked.append(base)
        todo = [c for c in reversed(target.split("/")) if c not in ("", ".")]
        done: list[str] = []
        hops = 0
        while todo:
            comp = todo.pop()
            if base.owned and (done or comp != os.path.basename(base.grant.path)):
                raise _Refused("beneath a file grant")
            if comp == "..":
                if not done:
                    raise _Refused("path escapes the grant (.. above its root)")
                done.pop()
                continue
            last = not todo
            name = "/".join([*done, comp])
            try:
                fd = openat2(base.fd, name, _PATH_FLAGS | os.O_NOFOLLOW, 0, base.resolve)
            except OSError as err:
                if last and err.errno == errno.ENOENT:
                    if creating and through_last_link:
                        raise _Refused(
                            "the name is a dangling symlink (a create does not go through it)"
                        ) from None
                    done.append(comp)  # may be created
                    break
                raise self._walk_error(err) from None
            try:
                if not stat.S_ISLNK(os.fstat(fd).st_mode) or (
                    last and not follow_last and not trailing
                ):
                    done.append(comp)
                    continue
                link = os.readlink("", dir_fd=fd)
            finally:
                os.close(fd)
            hops += 1
            through_last_link = through_last_link or last
            if hops > MAXSYMLINKS:
                raise _Refused(f"more than {MAXSYMLINKS} symlinks", errno.ELOOP)
            if not base.grant.symlinks:
                raise _Refused(
                    f"path goes through a symlink beneath {base.grant.path} "
                    "and that grant does not allow symlinks"
                )
            if base.owned:
                # A file grant's parent is not granted: a relative link there
                # is a new absolute path, without ".." (no lexical guessing).
                if ".." in link.split("/"):
                    raise _Refused("a symlink with .. in a file grant")
                link = os.path.join(os.path.dirname(base.grant.path), link)
            if not link.startswith("/"):
                todo.extend(c for c in reversed(link.split("/")) if c not in ("", "."))
                continue
            rest = "/".join(reversed(todo))
            next_path = link + "/" + rest if rest else link
            try:
                grant, beneath = self._select(next_path, need)
            except _Refused as refused:
                raise _Refused(f"a symlink leads to {link!r}: {refused.reason}") from None
            root = self._root(grant)
            if root is None:
                if beneath.strip("/."):
                    raise _Refused(f"a symlink leads to {link!r}, beneath a file grant")
                parent = os.open(os.path.dirname(grant.path), _PATH_FLAGS | os.O_DIRECTORY)
                base = _Base(grant, parent, True, self._resolve[grant] | RESOLVE_NO_SYMLINKS)
                beneath = os.path.basename(grant.path)
            else:
                base = _Base(grant, root, False, self._resolve[grant] | RESOLVE_NO_SYMLINKS)
            walked.append(base)
            todo = [c for c in reversed(beneath.split("/")) if c not in ("", ".")]
            done = []
        if base.owned and not done:
            raise _Refused("beneath a file grant")
        place = "/".join(done) or "."
        return base, place + "/" if trailing and done else place
