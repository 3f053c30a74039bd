"""The notification loop: receive each intercepted open, decide it, answer it.

One receiver thread polls the listener and only receives; workers do
everything else, one notification each, from reading the caller's memory to
the reply.  Why: any step can block for as long as the caller or the file
system likes (``process_vm_readv`` on memory behind userfaultfd or FUSE, an
open of a hung file, an NFS server gone), and such an open must hold up
only the thread that asked for it.  Workers are started as they are needed
(a notification arrives and none is idle), up to ``max_workers``; past that,
new notifications wait for a worker.  So ``max_workers`` hung opens at once
stall the rest: that is the bound, and it is logged when reached.

Per notification, in order (DESIGN.md section 6):

1. decode the call (``open``/``openat``/``openat2``/``creat``) and mask its
   flags as the kernel would (open/openat ignore unknown bits, openat2
   refuses them with EINVAL);
2. read the path with ``process_vm_readv`` from the calling TID; make a
   relative name absolute against that thread's ``dirfd`` or cwd; prefix the
   thread's root if it chrooted; rewrite ``/proc/self`` and
   ``/proc/thread-self``; read its Tgid and umask from ``/proc/TID/status``;
3. ``SECCOMP_IOCTL_NOTIF_ID_VALID``, *after* all of those reads: if the
   caller died meanwhile its TID may belong to someone else, whose memory
   and cwd we would have read;
4. decide and open with the broker's gate (:mod:`testbed.supervise.decide`),
   with this worker's umask set to the caller's (workers have their own
   ``fs_struct`` through ``unshare(CLONE_FS)``, so this touches no other
   thread);
5. write the audit record, then answer: ``SECCOMP_IOCTL_NOTIF_ADDFD`` installs
   the fd, our copy is closed, and ``SECCOMP_IOCTL_NOTIF_SEND`` answers with its
   number (``O_CLOEXEC`` as the caller asked; not ``SECCOMP_ADDFD_FLAG_SEND``,
   see ``_answer``), or ``SECCOMP_IOCTL_NOTIF_SEND`` with the errno.  If
   injecting fails for any reason but ENOENT (the caller is gone), the
   caller still gets an answer with that errno, or it would wait for ever;
   any unexpected error in steps 1-4 answers EIO.

``SECCOMP_USER_NOTIF_FLAG_CONTINUE`` is never used: the path could change
after it was read, so the supervisor opens what it read.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import queue
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from testbed.broker import AuditLog
from testbed.broker.gate import Outcome
from testbed.errors import SuperviseArgumentError, WaitTimeout
from testbed.protocol.flags import flag_names
from testbed.supervise import bpf, target
from testbed.supervise.audit import SeccompAuditRecord
from testbed.supervise.decide import Decider
from testbed.supervise.seccomp import Listener, SeccompNotif, libc

log = logging.getLogger("testbed.supervise")

#: How long stop() waits for the receiver and workers to finish and close the listener.
STOP_TIMEOUT = 30.0

CLONE_FS = 0x200
_O_TMPFILE_BIT = os.O_TMPFILE & ~os.O_DIRECTORY
_FASYNC = 0o20000
_O_SYNC_BIT = 0o4000000
#: VALID_OPEN_FLAGS of include/linux/fcntl.h (x86_64).
VALID_OPEN_FLAGS = (
    os.O_ACCMODE
    | os.O_CREAT
    | os.O_EXCL
    | os.O_NOCTTY
    | os.O_TRUNC
    | os.O_APPEND
    | os.O_NONBLOCK
    | os.O_DSYNC
    | _FASYNC
    | os.O_DIRECT
    | 0o100000  # O_LARGEFILE
    | os.O_DIRECTORY
    | os.O_NOFOLLOW
    | os.O_NOATIME
    | os.O_CLOEXEC
    | _O_SYNC_BIT
    | os.O_PATH
    | _O_TMPFILE_BIT
)
O_PATH_FLAGS = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_PATH | os.O_CLOEXEC
S_IALLUGO = 0o7777
DEFAULT_MAX_WORKERS = 32


@dataclass(frozen=True, kw_only=True, slots=True)
class OpenCall:
    """An intercepted call, decoded: what ``open(2)`` semantics it asks for."""

    syscall: str
    dirfd: int
    path_addr: int
    flags: int
    mode: int


def _s32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def decode(notif: SeccompNotif) -> OpenCall:
    """The call of ``notif`` with the kernel's flag rules applied.

    Raises :class:`~testbed.supervise.target.TargetError` for what the
    kernel itself would refuse (openat2's EINVAL/E2BIG).
    """
    nr = notif.data.nr
    args = notif.data.args
    tid = notif.pid
    if nr == bpf.NR_OPEN:
        call = OpenCall(
            syscall="open", dirfd=target.AT_FDCWD, path_addr=args[0], flags=args[1], mode=args[2]
        )
    elif nr == bpf.NR_CREAT:
        flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC
        call = OpenCall(
            syscall="creat", dirfd=target.AT_FDCWD, path_addr=args[0], flags=flags, mode=args[1]
        )
    elif nr == bpf.NR_OPENAT:
        call = OpenCall(
            syscall="openat", dirfd=_s32(args[0]), path_addr=args[1], flags=args[2], mode=args[3]
        )
    elif nr == bpf.NR_OPENAT2:
        how = target.read_open_how(tid, args[2], args[3])
        if how.flags & ~VALID_OPEN_FLAGS:
            raise target.TargetError(errno.EINVAL, f"openat2 flags {how.flags:#x} unknown bits")
        if how.mode & ~S_IALLUGO:
            raise target.TargetError(errno.EINVAL, f"openat2 mode {how.mode:#o}")
        if how.mode and not _will_create(how.flags):
            raise target.TargetError(errno.EINVAL, "openat2 mode without O_CREAT or O_TMPFILE")
        if how.flags & os.O_PATH and how.flags & ~O_PATH_FLAGS:
            raise target.TargetError(errno.EINVAL, "openat2 O_PATH with other flags")
        if how.resolve:
            # Honouring RESOLVE_* relative to the caller's dirfd is not
            # implemented; ENOSYS makes callers fall back to openat.
            raise target.TargetError(errno.ENOSYS, f"openat2 resolve {how.resolve:#x} not served")
        return OpenCall(
            syscall="openat2",
            dirfd=_s32(args[0]),
            path_addr=args[1],
            flags=how.flags,
            mode=how.mode,
        )
    else:
        raise target.TargetError(errno.ENOSYS, f"system call {nr} is not served")
    # open/openat: unknown bits are ignored, the mode only counts for a create
    flags = call.flags & VALID_OPEN_FLAGS & ~_FASYNC
    if flags & os.O_PATH:
        flags &= O_PATH_FLAGS
    mode = call.mode & S_IALLUGO if _will_create(flags) else 0
    return OpenCall(
        syscall=call.syscall, dirfd=call.dirfd, path_addr=call.path_addr, flags=flags, mode=mode
    )


def _will_create(flags: int) -> bool:
    return bool(flags & os.O_CREAT) or flags & os.O_TMPFILE == os.O_TMPFILE


@dataclass(frozen=True, kw_only=True, slots=True)
class Resolved:
    #: The name as the caller gave it (what strace shows, what the audit log calls path).
    asked: str
    #: The absolute name the policy decides on.
    path: str
    tgid: int
    umask: int
    uid: int


def resolve(tid: int, call: OpenCall) -> Resolved:
    """Step 2: the absolute name the call means, and what else the decision needs."""
    raw = target.read_path(tid, call.path_addr)
    if not raw:
        raise target.TargetError(errno.ENOENT, "empty path")
    name = os.fsdecode(raw)
    if name.startswith("/"):
        root = target.root_of(tid)
        if root != "/":
            name = root + name
    else:
        name = target.directory_of(tid, call.dirfd) + "/" + name
    status = target.read_status(tid)
    path = target.rewrite_proc_self(target.normalise(name), tgid=status.tgid, tid=tid)
    return Resolved(
        asked=os.fsdecode(raw), path=path, tgid=status.tgid, umask=status.umask, uid=status.uid
    )


#: Called by a worker after step 2, before the validity check (tests use it
#: to make the caller vanish exactly there).
AfterReads = Callable[[SeccompNotif, str], None]


class NotificationServer:
    """Serves one listener until every process under its filter is gone, or :meth:`stop`."""

    def __init__(
        self,
        listener: Listener,
        decider: Decider,
        audit: AuditLog,
        *,
        max_workers: int = DEFAULT_MAX_WORKERS,
        conn: int = 1,
    ) -> None:
        if max_workers < 1:
            raise SuperviseArgumentError(f"max_workers must be at least 1, not {max_workers}")
        self.listener = listener
        self.decider = decider
        self.audit = audit
        self.max_workers = max_workers
        self.conn = conn
        self.after_reads: AfterReads | None = None
        self.served = 0
        self._queue: queue.SimpleQueue[SeccompNotif | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._workers: list[threading.Thread] = []
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._receiver: threading.Thread | None = None
        self._finished = False  # the receiver is done and the stop pipe closed
        self._warned_full = False
        self._private_fs = threading.local()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._receiver = threading.Thread(
            target=self._receive_loop, name="seccomp-receiver", daemon=True
        )
        self._receiver.start()

    def stop(self) -> None:
        """Stop receiving and close the listener: the callers' opens now fail ENOSYS.

        Returns only once the listener is closed, so nothing is served after it
        (a loaded machine once took more than 5 s to get there, and an open made
        after stop() was still answered); a receiver that does not finish within
        ``STOP_TIMEOUT`` is a :class:`~testbed.errors.WaitTimeout`.
        """
        with self._lock:
            if not self._finished:  # else the pipe's fd numbers may be someone else's
                with contextlib.suppress(OSError):
                    os.write(self._stop_w, b"x")
        if not self.join(STOP_TIMEOUT):
            raise WaitTimeout("the seccomp receiver and its workers to stop", STOP_TIMEOUT)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the receiver and the workers to finish; False if the timeout ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        threads = [self._receiver] if self._receiver else []
        for t in threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            return False
        with self._lock:
            workers = list(self._workers)
        for t in workers:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in workers)

    @property
    def workers(self) -> int:
        with self._lock:
            return len(self._workers)

    # -- receiving ---------------------------------------------------------------------

    def _receive_loop(self) -> None:
        poller = select.poll()
        poller.register(self.listener.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if self._stop_r in events:
                    break
                ev = events.get(self.listener.fd, 0)
                if ev & select.POLLIN:
                    try:
                        notif = self.listener.recv()
                    except OSError as err:
                        if err.errno in (errno.ENOENT, errno.EINTR):
                            continue  # the caller vanished before we took it
                        log.error("receiving a notification failed: %s", err)
                        break
                    self._dispatch(notif)
                elif ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    break  # nobody is left under the filter
        finally:
            with self._lock:
                n = len(self._workers)
            for _ in range(n):
                self._queue.put(None)
            # Workers may still be answering: the listener closes after the last
            # is done, so its fd number cannot be reused under one of them.  One
            # blocked opening a FIFO whose other end never comes is woken.
            for t in list(self._workers):
                while t.is_alive():
                    if self.decider.release_blocked():
                        log.info("woke a worker blocked opening a FIFO, to stop")
                    t.join(0.1)
            self.listener.close()
            with self._lock:
                self._finished = True
                os.close(self._stop_r)
                os.close(self._stop_w)

    def _dispatch(self, notif: SeccompNotif) -> None:
        with self._lock:
            if self._idle <= 0:
                if len(self._workers) < self.max_workers:
                    t = threading.Thread(
                        target=self._work, name=f"seccomp-worker-{len(self._workers)}", daemon=True
                    )
                    self._workers.append(t)
                    self._idle += 1
                    t.start()
                elif not self._warned_full:
                    self._warned_full = True
                    log.warning(
                        "all %d workers are busy (slow or hung opens?): new opens wait",
                        self.max_workers,
                    )
            self._idle -= 1
        self._queue.put(notif)

    # -- one notification -----------------------------------------------------------------

    def _work(self) -> None:
        # A private fs_struct: this worker's umask can then be the caller's.
        self._private_fs.ok = libc().unshare(CLONE_FS) == 0
        if not self._private_fs.ok:
            log.error(
                "unshare(CLONE_FS): %s: created files get the supervisor's umask",
                os.strerror(ctypes.get_errno()),
            )
        while True:
            notif = self._queue.get()
            if notif is None:
                return
            try:
                self.handle(notif)
            finally:
                with self._lock:
                    self._idle += 1

    def handle(self, notif: SeccompNotif) -> None:
        started = time.monotonic()
        wall = time.time()
        answered = False
        path = asked = ""
        dirfd = target.AT_FDCWD
        flags = mode = 0
        tgid = 0
        tid = notif.pid
        outcome: Outcome
        try:
            try:
                call = decode(notif)
                flags, mode, dirfd = call.flags, call.mode, call.dirfd
                resolved = resolve(tid, call)
                path, asked, tgid = resolved.path, resolved.asked, resolved.tgid
                if self.after_reads is not None:
                    self.after_reads(notif, path)
            except target.TargetError as err:
                outcome = Outcome(result=-err.errno, reason=err.reason)
                if not self.listener.id_valid(notif.id):
                    answered = True  # nobody is waiting for an answer
                    return
            else:
                if not self.listener.id_valid(notif.id):
                    log.info("tid %d went away before its open of %s was decided", tid, path)
                    answered = True
                    return
                peer = self._peer_problem(resolved)
                if peer:
                    outcome = self.decider.images.refuse(peer)
                elif call.flags & os.O_TMPFILE == os.O_TMPFILE:
                    # an unnamed file cannot be audited by name; callers fall back
                    outcome = Outcome(result=-errno.EOPNOTSUPP, reason="O_TMPFILE is not served")
                else:
                    if call.flags & os.O_CREAT and getattr(self._private_fs, "ok", False):
                        os.umask(resolved.umask)
                    outcome, _ = self.decider.decide(path, flags, mode, tgid=tgid)
            record = _Record(wall, started, tgid, tid, asked, path, dirfd, flags, mode)
            self._record(record, outcome.result, outcome.reason)
            answered = self._answer(notif, outcome, record)
        except Exception:
            log.exception("serving tid %d's open of %r failed", tid, path)
        finally:
            self.served += 1
            if not answered:
                self._reply_error(notif.id, -errno.EIO)

    def _peer_problem(self, r: Resolved) -> str:
        """The broker's peer_uid/peer_pid rules, for the process that asked."""
        policy = self.decider.policy
        if policy.peer_uid is not None and r.uid != policy.peer_uid:
            return f"uid {r.uid} is not the policy's peer_uid {policy.peer_uid}"
        if policy.peer_pid is not None and r.tgid != policy.peer_pid:
            return f"pid {r.tgid} is not the policy's peer_pid {policy.peer_pid}"
        return ""

    def _answer(self, notif: SeccompNotif, outcome: Outcome, record: _Record) -> bool:
        flags, path = record.flags, record.path
        if outcome.result != 0 or outcome.fd is None:
            self._reply_error(notif.id, outcome.result or -errno.EIO)
            return True
        # Install, close our copy, then answer: never ADDFD_FLAG_SEND.  With
        # SEND the caller resumes while our copy of the descriptor is still
        # open, and an open file description outlives the caller's close as
        # long as any copy does, together with the OFD locks QEMU took on it:
        # QEMU's next lock check then meets its own stale locks and its
        # permission change takes another path (seen as an extra O_RDWR
        # reopen in 3 of 8 runs of raw_drive-device_mirror-full, 0 of 16
        # this way).  Answering separately is safe because the supervisor
        # needs WAIT_KILLABLE_RECV: once received, only a fatal signal can
        # end the caller's wait, and then nobody is left to leak into.
        try:
            theirs = self.listener.install_fd(
                notif.id, outcome.fd, cloexec=bool(flags & os.O_CLOEXEC)
            )
        except OSError as err:
            if err.errno == errno.ENOENT:
                log.info("tid %d went away before its fd for %s was installed", notif.pid, path)
                return True
            # EMFILE (its table is full) and the like: it must still hear back
            code = err.errno or errno.EIO
            self._record(record, -code, f"injecting the descriptor failed: {err.strerror}")
            self._reply_error(notif.id, -code)
            return True
        finally:
            os.close(outcome.fd)
        try:
            self.listener.reply(notif.id, val=theirs)
        except OSError as err:
            if err.errno != errno.ENOENT:  # ENOENT: the caller died after the install
                log.error("answering notification %#x failed: %s", notif.id, err)
        return True

    def _reply_error(self, notif_id: int, error: int) -> None:
        try:
            self.listener.reply(notif_id, error=error)
        except OSError as err:
            if err.errno != errno.ENOENT:  # ENOENT: the caller is gone, nobody to answer
                log.error("answering notification %#x failed: %s", notif_id, err)

    def _record(self, r: _Record, result: int, reason: str) -> None:
        if not self.audit.active:
            return
        self.audit.write(
            SeccompAuditRecord(
                time=r.wall,
                conn=self.conn,
                peer_pid=r.tgid,
                path=r.asked,
                flags=r.flags,
                flag_names=tuple(flag_names(r.flags)),
                mode=r.mode,
                result=result,
                latency_us=round((time.monotonic() - r.started) * 1e6, 1),
                reason=reason,
                tid=r.tid,
                resolved=r.path,
                dirfd=r.dirfd,
            )
        )


@dataclass(frozen=True, slots=True)
class _Record:
    """What an audit record of one notification says, besides its result."""

    wall: float
    started: float
    tgid: int
    tid: int
    asked: str
    path: str
    dirfd: int
    flags: int
    mode: int
