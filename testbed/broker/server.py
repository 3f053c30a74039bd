"""The broker's event loop: many peers, one thread, nobody blocks anybody.

What one connection can cost the broker, whatever its peer does:

* **memory**: a connection is read only once every whole request already
  read has been answered and its replies sent, and a request is buffered
  whole only if it can be valid, so at most ``MAX_BUFFERED`` bytes of
  request data (one frame of 18 + 4096 bytes less one, plus one read of
  ``RECV_SIZE``) and one unsent reply are held per connection;
* **descriptors**: at most ``FD_REPLY_CAP`` replies carrying a descriptor
  that the peer has not read yet (checked with ``SIOCOUTQ`` every
  ``FD_REPLY_CAP`` fd replies); past that, the next reply (and its one fd)
  waits in the broker and the connection is not read until the peer has
  read everything.  The kernel charges unread descriptors to the *broker's*
  user (at most RLIMIT_NOFILE of them in flight, unless it has
  CAP_SYS_RESOURCE); when that quota is full anyway (``ETOOMANYREFS``),
  peers that pipeline without reading are closed first and the reply is
  retried later: a peer that follows the protocol is never closed for it;
* **the loop**: a connection is served at most ``batch`` requests per turn
  before the others get theirs.

Descriptors for the broker itself: each connection can need two (its socket
and one held reply), so the broker accepts at most ``max_connections``
peers, by default what RLIMIT_NOFILE leaves after the descriptors open at
start, one per grant root and ``FD_HEADROOM`` for the opens in progress.
At that count, or on ``EMFILE``/``ENFILE`` from accept (descriptors used by
something else), the listener is not watched until a connection closes (or,
for EMFILE, a back-off expires): logged once per episode, with the count of
refused accepts at its end; open connections keep being served.

Broker-wide: the gate's remembered decisions (the fast path: a request
frame received whole that the gate has a decision for is answered by
:meth:`Gate.open_decided`, everything else by the decoder and
:meth:`Gate.handle`), at most ``FAST_ENTRIES`` of them, whatever the peers
send (testbed/broker/gate.py).

A malformed frame, descriptors sent *to* the broker, or a peer the policy
does not accept close that connection (logged with the reason); everyone
else is unaffected.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import math
import os
import resource
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from testbed.broker.answer import answer, audited, names
from testbed.broker.audit import AuditLog, AuditRecord
from testbed.broker.gate import Decision, Gate, Outcome
from testbed.broker.policy import Policy
from testbed.errors import BrokerStateError, ProtocolError, TransportError, WaitTimeout
from testbed.protocol import (
    NEED_DATA,
    PATH_MAX,
    REQUEST_FIXED_SIZE,
    InvalidRequest,
    OpenRequest,
    RequestDecoder,
    encode_reply,
)
from testbed.transport import (
    CMSG_SPACE,
    MSG_CMSG_CLOEXEC,
    MSG_CTRUNC,
    MSG_DONTWAIT,
    MSG_NOSIGNAL,
    SCM_RIGHTS,
    SOL_SOCKET,
    close_fds,
    parse_rights,
)

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger("testbed.broker")

_UCRED = struct.Struct("3i")
_OUTQ = struct.Struct("i")
_FD = struct.Struct("i")
_SIOCOUTQ = 0x5411  # bytes a peer has not read yet (TIOCOUTQ)

_REPLY_OK = encode_reply(0)
RECV_SIZE = 4096  # requests are at most 18 + 4096 bytes that matter; smaller is cheaper
#: The most request bytes one connection can make the broker hold.
MAX_BUFFERED = REQUEST_FIXED_SIZE + PATH_MAX - 1 + RECV_SIZE
#: Replies with a descriptor a peer may leave unread before the broker waits.
FD_REPLY_CAP = 4
#: Descriptors kept free for opens in progress, the audit log and the like.
FD_HEADROOM = 8
#: How soon a held reply or a paused listener is looked at again (seconds).
RETRY_MIN, RETRY_MAX = 0.01, 1.0
_SEND_FLAGS = MSG_NOSIGNAL | MSG_DONTWAIT
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid=pid, uid=uid, gid=gid)


def unread_bytes(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that its peer has not read yet (``SIOCOUTQ``)."""
    raw = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0" * _OUTQ.size)
    return int(_OUTQ.unpack(raw)[0])


@dataclass(eq=False)
class Connection:
    id: int
    sock: socket.socket
    peer: PeerCred
    decoder: RequestDecoder = field(default_factory=RequestDecoder)
    #: Replies not yet fully sent: (bytes left, fd to attach or None).
    outq: collections.deque[tuple[bytes, int | None]] = field(default_factory=collections.deque)
    requests: int = 0
    #: fd replies sent since the peer was last seen to have read everything.
    unread_fds: int = 0
    #: The epoll events asked for now (0: neither read nor write).
    events: int = _IN
    #: Why the head of ``outq`` waits for the retry timer ("" if it does not).
    held: str = ""


class Runstate(Enum):
    """Where a :class:`Broker` is in its life; it only moves forward."""

    #: Built; nothing is served yet (connections and listeners may be added).
    IDLE = "idle"
    #: :meth:`Broker.start` or :meth:`Broker.serve` has the loop running.
    RUNNING = "running"
    #: Shut down: connections, listeners, epoll, gate and audit log closed.
    CLOSED = "closed"


class Broker:
    """Serves -open-hook-fd peers under a policy.

    Use as a context manager (serves in a background thread) or call
    :meth:`serve` from the main thread.  ``exit_when_idle`` makes the loop
    end once it has no listener and its last connection closed, which is
    what ``--fd`` wants: the broker lives as long as its QEMU.  ``poll_us``
    is the polling window after the last request (0, the default here: none;
    ``testbed broker`` defaults to 100, see :meth:`_serve`).
    """

    def __init__(
        self,
        policy: Policy,
        *,
        audit_path: str | Path | None = None,
        keep_records: bool = True,
        batch: int = 32,
        exit_when_idle: bool = False,
        max_connections: int | None = None,
        poll_us: int = 0,
    ) -> None:
        self.policy = policy
        #: After the last request, poll this long before sleeping (see _serve).
        self.poll_ns = poll_us * 1000
        # whether polling may help; _polling reads the CPU mask on its first turn
        self._may_poll = False
        self._idle_turns = -1
        self.gate = Gate(policy)
        #: the gate's decisions, looked up by each frame received whole (the fast path)
        self._decisions = self.gate.decisions
        self.audit = AuditLog(audit_path, keep=keep_records)
        self._auditing = self.audit.active
        self.batch = batch
        self.exit_when_idle = exit_when_idle
        # epoll directly rather than selectors: the loop turns once per
        # request, and selectors' key objects cost microseconds each turn.
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, _IN)
        #: fd -> what it is: None (wake pipe), a listening socket, or a Connection
        self._watch: dict[int, Connection | socket.socket | None] = {self._wake_r: None}
        self._pending_add: collections.deque[tuple[str, socket.socket]] = collections.deque()
        self._conns: dict[int, Connection] = {}
        self._listeners: dict[int, socket.socket] = {}
        self._ready: set[Connection] = set()
        self._held: set[Connection] = set()
        self._next_id = 1
        self._state = Runstate.IDLE
        # Asking to stop is apart from the state: a stop may come before the
        # loop runs, and from a signal handler, which must not take a lock.
        self._stop = threading.Event()
        #: set by :meth:`stop_soon` (a signal handler), which must take no lock
        self._stop_requested = False
        #: the thread :meth:`start` made (None when :meth:`serve` runs in the caller's)
        self._thread: threading.Thread | None = None
        self.served_connections = 0
        # Accept pauses (EMFILE/ENFILE) and ETOOMANYREFS episodes.
        self._accept_paused = False
        self._accept_refused = 0
        self._accept_retry_at = 0.0
        self._accept_backoff = RETRY_MIN
        self._retry_at = 0.0
        self._retry_backoff = RETRY_MIN
        self._refs_held = 0
        self.max_connections = max_connections or self._connection_budget()

    def _connection_budget(self) -> int:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return 1 << 20
        in_use = len(os.listdir("/proc/self/fd"))
        spare = soft - in_use - len(self.policy.grants) - FD_HEADROOM
        return max(1, spare // 2)

    # -- public API ---------------------------------------------------------

    @property
    def runstate(self) -> Runstate:
        return self._state

    def _require(self, action: str, *states: Runstate) -> None:
        """Refuse ``action`` unless the broker is in one of ``states``."""
        if self._state not in states:
            raise BrokerStateError(f"cannot {action}", state=self._state.value)

    @property
    def records(self) -> list[AuditRecord]:
        """Every answered request so far, in arrival order (a copy)."""
        return self.audit.snapshot()

    def add_connection(self, sock: socket.socket) -> None:
        """Serve one connected peer (thread-safe; the broker owns ``sock`` now)."""
        self._pending_add.append(("conn", sock))
        self._wake()

    def add_listener(self, sock: socket.socket) -> None:
        """Accept peers from a listening socket (thread-safe)."""
        self._pending_add.append(("listen", sock))
        self._wake()

    def start(self) -> Broker:
        """Serve in a daemon thread until :meth:`stop`."""
        self._require("start the broker", Runstate.IDLE)
        # RUNNING before the thread runs: __enter__ and a second start() see it at once.
        self._state = Runstate.RUNNING
        self._thread = threading.Thread(target=self._serve, name="testbed-broker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, close every connection and the audit log."""
        self._stop.set()
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                raise WaitTimeout("the broker thread to finish", timeout)
            self._shutdown()

    def stop_soon(self) -> None:
        """Ask the loop to stop, from a signal handler: takes no lock, logs nothing.

        ``stop()`` sets a ``threading.Event``, whose non-reentrant lock a
        handler could find already held by the very thread it interrupted,
        and wait on for ever (seen as brokers hung in futex_wait after
        SIGTERM).
        """
        self._stop_requested = True
        self._wake()

    def __enter__(self) -> Broker:
        """Serve (if not serving yet) until the ``with`` block ends."""
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve(self) -> None:
        """Run the loop in the calling thread until stopped (or idle, see above)."""
        self._require("serve", Runstate.IDLE)
        self._state = Runstate.RUNNING
        self._serve()

    def _serve(self) -> None:
        """The loop, with the common event (a peer's request) and the polling window inline.

        Polling: a peer's next open often comes right after the last answer
        (a backing chain, a format probe), and on a virtual machine waking a
        sleeping vCPU costs more than serving the open.  So for ``poll_ns``
        after the loop ran out of work it polls instead of sleeping, as QEMU's
        own event loop does (``poll-max-ns``) -- but only while the broker may
        run on more than one CPU (re-read every 256 idle turns): pinned alone
        to a core it would only take that core from its peer.
        """
        watch, ready, pending, poll = self._watch, self._ready, self._pending_add, self._epoll.poll
        poll_ns, idle_since = self.poll_ns, 0
        try:
            while not (self._stop_requested or self._stop.is_set()):
                if pending:
                    self._take_pending()
                if (
                    self.exit_when_idle
                    and self.served_connections
                    and not (self._conns or self._listeners)
                ):
                    log.info("last connection closed; exiting")
                    break
                if ready:
                    timeout: float = 0
                else:
                    timeout = self._timeout() if self._held or self._accept_paused else -1
                    if timeout < 0 and poll_ns and self._polling():
                        now = time.monotonic_ns()
                        if not idle_since:
                            idle_since = now
                        if now - idle_since < poll_ns:
                            timeout = 0
                events = poll(timeout)
                if events:
                    idle_since = 0
                for fd, mask in events:
                    conn = watch.get(fd)
                    # The common event (a peer's request) without _dispatch's sorting.
                    if mask == _IN and isinstance(conn, Connection) and conn.events & _IN:
                        self._read(conn)
                    else:
                        self._dispatch(fd, mask)
                if self._held or self._accept_paused:
                    self._retry_timers()
                if ready:
                    for conn in list(ready):
                        ready.discard(conn)
                        if conn.id in self._conns:
                            self._process(conn)
        finally:
            if self._thread is None or self._thread is threading.current_thread():
                self._shutdown()

    # -- loop internals -----------------------------------------------------

    def _polling(self) -> bool:
        """Whether polling may help: the broker can run on more than one CPU."""
        self._idle_turns += 1
        if not self._idle_turns & 255:
            self._may_poll = len(os.sched_getaffinity(0)) > 1
        return self._may_poll

    def _timeout(self) -> float:
        if self._ready:
            return 0
        if not (self._held or self._accept_paused):
            return -1
        due = []
        if self._held:
            due.append(self._retry_at)
        if self._accept_paused:
            due.append(self._accept_retry_at)
        soonest = min(due)
        return -1 if soonest == math.inf else max(0.0, soonest - time.monotonic())

    def _wake(self) -> None:
        # A full pipe means the loop is awake already; a closed one, shut down.
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _take_pending(self) -> None:
        while self._pending_add:
            kind, sock = self._pending_add.popleft()
            if kind == "listen":
                sock.setblocking(False)
                self._listeners[sock.fileno()] = sock
                self._watch[sock.fileno()] = sock
                self._epoll.register(sock.fileno(), 0 if self._accept_paused else _IN)
            else:
                self._accept_conn(sock)

    def _accept_conn(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            cred = peer_cred(sock)
        except OSError as err:
            log.warning("closing a connection: no peer credentials (%s)", err)
            sock.close()
            return
        refusal = self._refuse_peer(cred)
        if refusal:
            log.warning("closing connection from pid %d uid %d: %s", cred.pid, cred.uid, refusal)
            sock.close()
            return
        conn = Connection(id=self._next_id, sock=sock, peer=cred)
        self._next_id += 1
        self.served_connections += 1
        self._conns[conn.id] = conn
        self._watch[sock.fileno()] = conn
        self._epoll.register(sock.fileno(), _IN)
        log.debug("connection %d from pid %d uid %d", conn.id, cred.pid, cred.uid)

    def _refuse_peer(self, cred: PeerCred) -> str:
        p = self.policy
        if p.peer_uid is not None and cred.uid != p.peer_uid:
            return f"uid {cred.uid} is not the allowed uid {p.peer_uid}"
        if p.peer_pid is not None and cred.pid != p.peer_pid:
            return f"pid {cred.pid} is not the allowed pid {p.peer_pid}"
        return ""

    def _want(self, conn: Connection, events: int) -> None:
        """Ask epoll for ``events`` on ``conn`` (a syscall only when they change)."""
        if conn.events != events:
            conn.events = events
            self._epoll.modify(conn.sock.fileno(), events)

    def _dispatch(self, fd: int, mask: int) -> None:
        data = self._watch.get(fd)
        if data is None:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        elif isinstance(data, socket.socket):
            self._accept_from(data)
        else:
            if mask & _OUT:
                self._flush(data)
            if data.id not in self._conns:
                return
            if data.events & _IN and mask & (_IN | select.EPOLLHUP | select.EPOLLERR):
                self._read(data)
            elif mask & (select.EPOLLHUP | select.EPOLLERR) and not data.events:
                # A peer that hung up while it is not being read: nobody will
                # read its replies, so let it go now.
                self._drop(data, "")

    # -- accepting ----------------------------------------------------------

    def _accept_from(self, listener: socket.socket) -> None:
        for _ in range(64):
            if len(self._conns) >= self.max_connections:
                self._pause_accepting(
                    f"{len(self._conns)} connections, as many as RLIMIT_NOFILE allows", retry=False
                )
                return
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE):
                    self._pause_accepting(f"accept failed: {err.strerror}", retry=True)
                else:
                    log.warning("accept failed: %s", err)
                return
            if self._accept_refused:
                log.warning(
                    "accepting peers again, after %d refused accept(s)", self._accept_refused
                )
                self._accept_refused = 0
                self._accept_backoff = RETRY_MIN
            self._accept_conn(sock)

    def _pause_accepting(self, why: str, *, retry: bool) -> None:
        if not self._accept_refused:
            log.warning(
                "not accepting peers (%s) until a descriptor is freed; "
                "open connections are still served",
                why,
            )
        self._accept_refused += 1
        self._accept_paused = True
        if retry:
            self._accept_retry_at = time.monotonic() + self._accept_backoff
            self._accept_backoff = min(self._accept_backoff * 2, RETRY_MAX)
        else:
            self._accept_retry_at = math.inf  # only a closed connection frees the budget
        for fd in self._listeners:
            self._epoll.modify(fd, 0)

    def _resume_accepting(self) -> None:
        self._accept_paused = False
        for fd in self._listeners:
            self._epoll.modify(fd, _IN)

    # -- requests -----------------------------------------------------------

    def _read(self, conn: Connection) -> None:
        try:
            data, ancdata, msg_flags, _ = conn.sock.recvmsg(RECV_SIZE, CMSG_SPACE, MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._drop(conn, f"receive failed: {err}")
            return
        if ancdata or msg_flags & MSG_CTRUNC:
            self._sent_fds(conn, ancdata, msg_flags)
            return
        # The fast path: one whole request frame whose decision the gate
        # remembers, on a connection with nothing else pending.
        decision = self._decisions.get(data)
        if (
            decision is not None
            and not (conn.outq or conn.decoder.mid_frame)
            and self._answer_decided(conn, decision)
        ):
            return
        if not data:
            if conn.decoder.mid_frame:
                self._drop(conn, f"peer vanished mid-request ({conn.decoder.buffered} bytes)")
            else:
                self._drop(conn, "")
            return
        conn.decoder.feed(data)
        self._process(conn)

    def _sent_fds(
        self, conn: Connection, ancdata: list[tuple[int, int, bytes]], flags: int
    ) -> None:
        """The peer sent descriptors, which requests never carry: close them and it."""
        fds = parse_rights(ancdata)
        close_fds(fds)
        if flags & MSG_CTRUNC:
            self._drop(
                conn,
                "peer sent descriptors; requests carry none (ancillary data truncated "
                f"(MSG_CTRUNC): descriptors were lost, closed {len(fds)})",
            )
        else:
            self._drop(conn, f"peer sent {len(fds)} descriptor(s); requests carry none")

    def _answer_decided(self, conn: Connection, decision: Decision) -> bool:
        """Answer a request the gate has a decision for; False if it must go the general way."""
        start = time.perf_counter_ns() if self._auditing else 0
        try:
            fd = self.gate.open_decided(decision)
        except Exception:  # a bug here must not end the broker: the general way answers
            log.exception("the fast path failed for %r", decision.request)
            fd = -1
        if fd < 0:
            return False
        if self._auditing:
            outcome = audited(
                self.audit, decision.request, Outcome(result=0, fd=fd), start=start,
                conn=conn.id, peer_pid=conn.peer.pid,
            )  # fmt: skip
            self._deliver(conn, decision.request, outcome)
        else:
            conn.requests += 1  # what _deliver does for a granted open
            if conn.unread_fds < FD_REPLY_CAP:
                # What _send does when nothing is queued (the fast path's
                # condition) and the peer may have this many replies unread.
                try:
                    self._send_now(conn, _REPLY_OK, fd)
                except OSError as err:
                    self._send_failed(conn, _REPLY_OK, fd, err)
            else:
                self._send(conn, _REPLY_OK, fd)
        if conn.outq and conn.id in self._conns:
            # Not read until the peer takes its reply, as _process does.
            self._want(conn, 0 if conn.held else _OUT)
        return True

    def _process(self, conn: Connection) -> None:
        for _ in range(self.batch):
            if conn.outq:
                # Not read until the peer takes its replies: resumes from _flush.
                self._want(conn, 0 if conn.held else _OUT)
                return
            try:
                event = conn.decoder.next_event()
            except ProtocolError as err:
                self._drop(conn, f"malformed frame: {err}")
                return
            if event is NEED_DATA:
                if conn.events != _IN:
                    self._want(conn, _IN)
                return
            self._answer(conn, event)
            if conn.id not in self._conns:
                return
        # More may be buffered: come back after the others, reading nothing meanwhile.
        self._want(conn, 0)
        self._ready.add(conn)

    def _answer(self, conn: Connection, request: OpenRequest | InvalidRequest) -> None:
        if self._auditing:
            outcome = answer(self.gate, self.audit, request, conn=conn.id, peer_pid=conn.peer.pid)
        else:
            try:
                outcome = self.gate.handle(request)
            except OSError as err:  # anything the gate did not foresee is still an errno
                outcome = Outcome.failed(err, f"unexpected: {err}")
            except Exception as err:  # a bug in the gate refuses; it never ends the broker
                log.exception("deciding %r failed", request)
                outcome = Outcome(result=-errno.EIO, reason=f"internal error: {err!r}")
        if outcome.fd is not None and isinstance(request, OpenRequest):
            self.gate.remember(request, outcome)  # only ever an open that was granted
        self._deliver(conn, request, outcome)

    def _deliver(
        self, conn: Connection, request: OpenRequest | InvalidRequest, outcome: Outcome
    ) -> None:
        """Send ``outcome`` as the reply to ``request`` (either path's)."""
        conn.requests += 1
        result = outcome.result
        self._send(conn, _REPLY_OK if result == 0 else encode_reply(result), outcome.fd)
        if result < 0:
            log.info(
                "refused %r (%s): %s",
                request.path,
                "|".join(names(request.flags)),
                outcome.reason or os.strerror(-result),
            )

    # -- replies ------------------------------------------------------------

    def _send(self, conn: Connection, data: bytes, fd: int | None) -> None:
        if conn.outq:
            conn.outq.append((data, fd))
            return
        if fd is not None and conn.unread_fds >= FD_REPLY_CAP and not self._peer_read_all(conn):
            conn.outq.append((data, fd))
            self._hold(conn, "unread replies")
            return
        try:
            self._send_now(conn, data, fd)
        except OSError as err:
            self._send_failed(conn, data, fd, err)

    def _send_failed(self, conn: Connection, data: bytes, fd: int | None, err: OSError) -> None:
        """A first try at sending a reply failed (nothing was sent): queue it, or drop ``conn``."""
        if isinstance(err, BlockingIOError):
            conn.outq.append((data, fd))
        elif err.errno == errno.ETOOMANYREFS:
            conn.outq.append((data, fd))
            self._too_many_refs(conn)
        else:
            if fd is not None:
                os.close(fd)
            self._drop(conn, f"send failed: {err}")

    def _peer_read_all(self, conn: Connection) -> bool:
        try:
            if unread_bytes(conn.sock):
                return False
        except OSError:
            return True  # let the send itself say what is wrong
        conn.unread_fds = 0
        return True

    def _send_now(self, conn: Connection, data: bytes, fd: int | None) -> None:
        """Send one reply; on a partial send queue the rest (the fd has gone)."""
        sent = conn.sock.sendmsg(
            [data], [] if fd is None else [(SOL_SOCKET, SCM_RIGHTS, _FD.pack(fd))], _SEND_FLAGS
        )
        if fd is not None:
            os.close(fd)  # the peer has its own copy now
            conn.unread_fds += 1
            if self._refs_held:
                log.warning(
                    "descriptors can be sent again after %d reply(s) were held", self._refs_held
                )
                self._refs_held = 0
        if sent < len(data):
            conn.outq.appendleft((data[sent:], None))

    def _flush(self, conn: Connection) -> None:
        while conn.outq:
            data, fd = conn.outq[0]
            if fd is not None and conn.unread_fds >= FD_REPLY_CAP and not self._peer_read_all(conn):
                self._hold(conn, "unread replies")
                return
            conn.outq.popleft()
            try:
                self._send_now(conn, data, fd)
            except BlockingIOError:
                conn.outq.appendleft((data, fd))
                self._want(conn, _OUT)
                return
            except OSError as err:
                if err.errno == errno.ETOOMANYREFS:
                    conn.outq.appendleft((data, fd))
                    self._too_many_refs(conn)
                    return
                if fd is not None:
                    os.close(fd)
                self._drop(conn, f"send failed: {err}")
                return
        if conn.held:
            conn.held = ""
            self._held.discard(conn)
        self._process(conn)

    def _hold(self, conn: Connection, why: str) -> None:
        """Keep ``conn``'s replies (and requests) until the retry timer."""
        if not self._held:
            self._retry_backoff = RETRY_MIN
            self._retry_at = time.monotonic() + RETRY_MIN
        conn.held = why
        self._held.add(conn)
        self._want(conn, 0)

    def _too_many_refs(self, conn: Connection) -> None:
        """The broker's quota of descriptors in flight is full (ETOOMANYREFS)."""
        if not self._refs_held:
            log.warning(
                "descriptors in flight at the limit (ETOOMANYREFS): holding replies, "
                "closing peers that pipeline requests without reading their replies"
            )
        self._refs_held += 1
        for hog in [c for c in self._held if c.held == "unread replies" and c is not conn]:
            self._drop(hog, "it leaves replies unread while the descriptor quota is full")
        self._hold(conn, "descriptor quota")

    def _retry_timers(self) -> None:
        now = time.monotonic()
        if self._accept_paused and now >= self._accept_retry_at:
            self._resume_accepting()
        if self._held and now >= self._retry_at:
            for conn in list(self._held):
                if conn.id in self._conns:
                    self._flush(conn)
            self._retry_backoff = min(self._retry_backoff * 2, RETRY_MAX)
            self._retry_at = now + self._retry_backoff

    def _drop(self, conn: Connection, reason: str) -> None:
        if reason:
            log.warning("connection %d (pid %d) closed: %s", conn.id, conn.peer.pid, reason)
        else:
            log.debug(
                "connection %d (pid %d) closed by peer after %d request(s)",
                conn.id,
                conn.peer.pid,
                conn.requests,
            )
        self._conns.pop(conn.id, None)
        self._ready.discard(conn)
        self._held.discard(conn)
        close_fds([fd for _, fd in conn.outq if fd is not None])
        conn.outq.clear()
        fd = conn.sock.fileno()
        if self._watch.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)
        conn.sock.close()
        if self._accept_paused and len(self._conns) < self.max_connections:
            self._resume_accepting()  # a descriptor is free now

    def _shutdown(self) -> None:
        if self._state is Runstate.CLOSED:
            return
        self._state = Runstate.CLOSED
        for conn in list(self._conns.values()):
            self._drop(conn, "")
        for sock in self._listeners.values():
            sock.close()
        self._listeners.clear()
        while self._pending_add:
            self._pending_add.popleft()[1].close()
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.gate.close()
        self.audit.close()


def serve_socketpair(
    policy: Policy, *, audit_path: str | Path | None = None
) -> tuple[Broker, socket.socket]:
    """A started broker and the client end of a socketpair it serves.

    The caller owns both: it closes the socket and stops the broker.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    broker = Broker(policy, audit_path=audit_path)
    broker.add_connection(ours)
    broker.start()
    return broker, theirs


def listen_unix(path: str | Path, *, backlog: int = 128) -> socket.socket:
    """A listening UNIX socket at ``path``; the error names a path that is too long."""
    raw = os.fsencode(str(path))
    if len(raw) > 107:
        raise TransportError(
            f"UNIX socket path is {len(raw)} bytes, over the 107-byte limit: {path}"
        )
    # Bound and listening under a temporary name, then renamed into place: a
    # peer that sees the path never finds it refusing connections.
    tmp = os.path.join(os.path.dirname(raw), b".%d.%d.tmp" % (os.getpid(), time.monotonic_ns()))
    where = tmp if len(tmp) <= 107 else raw
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(where)
        sock.listen(backlog)
        if where is not raw:
            os.rename(where, raw)
    except OSError:
        sock.close()
        if where is not raw:
            with contextlib.suppress(OSError):
                os.unlink(where)
        raise
    return sock
