"""The broker's event loop: many peers, one thread, nobody blocks anybody.

Each connection is non-blocking and has its own decoder and a small queue
of replies that the peer has not read yet.  While that queue is not empty
the broker stops reading the connection's requests, so a peer that floods
requests without reading replies holds at most one batch of descriptors and
costs nothing but its own connection.  A connection is served at most
``batch`` requests per turn of the loop before the others get theirs.

A malformed frame, descriptors sent *to* the broker, or a peer the policy
does not accept close that connection (logged with the reason); everyone
else is unaffected.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from testbed.broker.audit import AuditLog, AuditRecord
from testbed.broker.gate import Gate, Outcome
from testbed.broker.policy import Policy
from testbed.errors import ProtocolError, TransportError, WaitTimeout
from testbed.protocol import NEED_DATA, InvalidRequest, OpenRequest, RequestDecoder, encode_reply
from testbed.protocol.flags import flag_names
from testbed.transport import MSG_DONTWAIT, MSG_NOSIGNAL, close_fds, recv_with_fds, rights

log = logging.getLogger("testbed.broker")

_UCRED = struct.Struct("3i")


@functools.lru_cache(maxsize=256)
def _names(flags: int) -> tuple[str, ...]:
    return tuple(flag_names(flags))


_REPLY_OK = encode_reply(0)
RECV_SIZE = 4096  # requests are at most 18 + 4096 bytes that matter; smaller is cheaper
_SEND_FLAGS = MSG_NOSIGNAL | MSG_DONTWAIT


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid=pid, uid=uid, gid=gid)


@dataclass(eq=False)
class Connection:
    id: int
    sock: socket.socket
    peer: PeerCred
    decoder: RequestDecoder = field(default_factory=RequestDecoder)
    #: Replies not yet fully sent: (bytes left, fd to attach or None).
    outq: collections.deque[tuple[bytes, int | None]] = field(default_factory=collections.deque)
    requests: int = 0


class Broker:
    """Serves -open-hook-fd peers under a policy.

    Use as a context manager (serves in a background thread) or call
    :meth:`serve` from the main thread.  ``exit_when_idle`` makes the loop
    end once it has no listener and its last connection closed, which is
    what ``--fd`` wants: the broker lives as long as its QEMU.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        audit_path: str | Path | None = None,
        keep_records: bool = True,
        batch: int = 32,
        exit_when_idle: bool = False,
    ) -> None:
        self.policy = policy
        self.gate = Gate(policy)
        self.audit = AuditLog(audit_path, keep=keep_records)
        self.batch = batch
        self.exit_when_idle = exit_when_idle
        # epoll directly rather than selectors: the loop turns once per
        # request, and selectors' key objects cost microseconds each turn.
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        #: fd -> what it is: None (wake pipe), a listening socket, or a Connection
        self._watch: dict[int, Connection | socket.socket | None] = {self._wake_r: None}
        self._pending_add: collections.deque[tuple[str, socket.socket]] = collections.deque()
        self._conns: dict[int, Connection] = {}
        self._listeners: dict[int, socket.socket] = {}
        self._ready: set[Connection] = set()
        self._next_id = 1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.served_connections = 0

    # -- public API ---------------------------------------------------------

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
        if self._thread is not None:
            raise RuntimeError("broker already started")
        self._thread = threading.Thread(target=self.serve, name="testbed-broker", daemon=True)
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

    def __enter__(self) -> Broker:
        """Serve (if not serving yet) until the ``with`` block ends."""
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve(self) -> None:
        """Run the loop in the calling thread until stopped (or idle, see above)."""
        try:
            while not self._stop.is_set():
                self._take_pending()
                if (
                    self.exit_when_idle
                    and self.served_connections
                    and not (self._conns or self._listeners)
                ):
                    log.info("last connection closed; exiting")
                    break
                for fd, mask in self._epoll.poll(0 if self._ready else -1):
                    self._dispatch(fd, mask)
                for conn in list(self._ready):
                    self._ready.discard(conn)
                    if conn.id in self._conns:
                        self._process(conn)
        finally:
            if self._thread is None or self._thread is threading.current_thread():
                self._shutdown()

    # -- loop internals -----------------------------------------------------

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
                self._epoll.register(sock.fileno(), select.EPOLLIN)
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
        self._epoll.register(sock.fileno(), select.EPOLLIN)
        log.debug("connection %d from pid %d uid %d", conn.id, cred.pid, cred.uid)

    def _refuse_peer(self, cred: PeerCred) -> str:
        p = self.policy
        if p.peer_uid is not None and cred.uid != p.peer_uid:
            return f"uid {cred.uid} is not the allowed uid {p.peer_uid}"
        if p.peer_pid is not None and cred.pid != p.peer_pid:
            return f"pid {cred.pid} is not the allowed pid {p.peer_pid}"
        return ""

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
            if mask & select.EPOLLOUT:
                self._flush(data)
            if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and (
                data.id in self._conns
            ):
                self._read(data)

    def _accept_from(self, listener: socket.socket) -> None:
        for _ in range(64):
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                log.warning("accept failed: %s", err)
                return
            self._accept_conn(sock)

    def _read(self, conn: Connection) -> None:
        try:
            data, fds = recv_with_fds(conn.sock, RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except TransportError as err:  # MSG_CTRUNC: the peer sent descriptors
            self._drop(conn, f"peer sent descriptors; requests carry none ({err})")
            return
        except OSError as err:
            self._drop(conn, f"receive failed: {err}")
            return
        if fds:
            close_fds(fds)
            self._drop(conn, f"peer sent {len(fds)} descriptor(s); requests carry none")
            return
        if not data:
            if conn.decoder.buffered:
                self._drop(conn, f"peer vanished mid-request ({conn.decoder.buffered} bytes)")
            else:
                self._drop(conn, "")
            return
        conn.decoder.feed(data)
        self._process(conn)

    def _process(self, conn: Connection) -> None:
        for _ in range(self.batch):
            if conn.outq:
                return  # resumes from _flush once the peer reads its replies
            try:
                event = conn.decoder.next_event()
            except ProtocolError as err:
                self._drop(conn, f"malformed frame: {err}")
                return
            if event is NEED_DATA:
                return
            self._answer(conn, event)
            if conn.id not in self._conns:
                return
        self._ready.add(conn)  # more may be buffered: come back after the others

    def _answer(self, conn: Connection, request: OpenRequest | InvalidRequest) -> None:
        auditing = self.audit.active
        start = time.perf_counter_ns() if auditing else 0
        try:
            outcome = self.gate.handle(request)
        except OSError as err:  # anything the gate did not foresee is still an errno
            outcome = Outcome(result=-(err.errno or 5), reason=f"unexpected: {err}")
        conn.requests += 1
        result = outcome.result
        if auditing:
            # Recorded before the reply leaves: once the peer has its answer,
            # the log (file and memory) already holds the request.
            self.audit.write(
                AuditRecord(
                    time=time.time(),
                    conn=conn.id,
                    peer_pid=conn.peer.pid,
                    path=request.path.decode("utf-8", "surrogateescape"),
                    flags=request.flags,
                    flag_names=_names(request.flags),
                    mode=request.mode,
                    result=result,
                    latency_us=round((time.perf_counter_ns() - start) / 1000, 1),
                    reason=outcome.reason,
                )
            )
        self._send(conn, _REPLY_OK if result == 0 else encode_reply(result), outcome.fd)
        if result < 0:
            log.info(
                "refused %r (%s): %s",
                request.path,
                "|".join(_names(request.flags)),
                outcome.reason or os.strerror(-result),
            )

    def _send(self, conn: Connection, data: bytes, fd: int | None) -> None:
        if conn.outq:
            conn.outq.append((data, fd))
            return
        try:
            self._send_now(conn, data, fd)
        except BlockingIOError:
            conn.outq.append((data, fd))
            self._epoll.modify(conn.sock.fileno(), select.EPOLLOUT)
        except OSError as err:
            if fd is not None:
                os.close(fd)
            self._drop(conn, f"send failed: {err}")

    def _send_now(self, conn: Connection, data: bytes, fd: int | None) -> None:
        """Send one reply; on a partial send queue the rest (the fd has gone)."""
        sent = conn.sock.sendmsg([data], rights(() if fd is None else (fd,)), _SEND_FLAGS)
        if fd is not None:
            os.close(fd)  # the peer has its own copy now
        if sent < len(data):
            conn.outq.appendleft((data[sent:], None))
            self._epoll.modify(conn.sock.fileno(), select.EPOLLOUT)

    def _flush(self, conn: Connection) -> None:
        while conn.outq:
            data, fd = conn.outq.popleft()
            try:
                self._send_now(conn, data, fd)
            except BlockingIOError:
                conn.outq.appendleft((data, fd))
                return
            except OSError as err:
                if fd is not None:
                    os.close(fd)
                self._drop(conn, f"send failed: {err}")
                return
        self._epoll.modify(conn.sock.fileno(), select.EPOLLIN)
        self._process(conn)

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
        close_fds([fd for _, fd in conn.outq if fd is not None])
        conn.outq.clear()
        fd = conn.sock.fileno()
        if self._watch.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)
        conn.sock.close()

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
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
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(raw)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock
