"""Frames and descriptors over a UNIX stream socket (SCM_RIGHTS).

The codec in :mod:`testbed.protocol` never sees a socket; this module is the
thin layer that moves its bytes and the descriptors riding with them.

Descriptor hygiene, the rule every function here keeps: a descriptor that
arrives is either handed to the caller or closed before an exception leaves
this module.  Descriptors are received with ``MSG_CMSG_CLOEXEC`` so none
leaks into a child process started meanwhile.  Python retries ``EINTR``
itself (PEP 475).
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Final

from testbed.errors import ProtocolError, TransportError, WaitTimeout
from testbed.protocol import NEED_DATA, OpenReply, ReplyDecoder, encode_request

log = logging.getLogger(__name__)

#: Room for this many fds in every receive, so that extra ones are seen
#: (and closed) rather than silently truncated.
MAX_FDS_PER_RECV: Final = 8
_FD_SIZE: Final = array.array("i").itemsize
CMSG_SPACE: Final = socket.CMSG_SPACE(MAX_FDS_PER_RECV * _FD_SIZE)
# Plain ints: socket's flag enums cost an enum operation per use on hot paths.
SOL_SOCKET: Final = int(socket.SOL_SOCKET)
SCM_RIGHTS: Final = int(socket.SCM_RIGHTS)
MSG_NOSIGNAL: Final = int(socket.MSG_NOSIGNAL)
MSG_DONTWAIT: Final = int(socket.MSG_DONTWAIT)
MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)
MSG_CMSG_CLOEXEC: Final = int(socket.MSG_CMSG_CLOEXEC)


def close_fds(fds: Sequence[int]) -> None:
    """Close every descriptor in ``fds``, ignoring ones already gone."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary data of a ``sendmsg`` that passes ``fds`` (none for no fds)."""
    return [(SOL_SOCKET, SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


def send_frame(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send ``data`` with ``fds`` attached to its first byte.

    A stream socket may take fewer bytes than offered; the rest is sent
    without ancillary data so the descriptors travel exactly once.
    """
    sent = sock.sendmsg([data], rights(fds), MSG_NOSIGNAL)
    if sent < len(data):
        sock.sendall(data[sent:], MSG_NOSIGNAL)


def parse_rights(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors in a recvmsg's ancillary data (other messages ignored)."""
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == SOL_SOCKET and kind == SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    return fds


def recv_with_fds(sock: socket.socket, bufsize: int = 4096) -> tuple[bytes, list[int]]:
    """One ``recvmsg``: the bytes and every descriptor that came with them.

    ``MSG_CTRUNC`` means descriptors were dropped by the kernel: whatever did
    arrive is closed and :class:`TransportError` raised.
    """
    data, ancdata, msg_flags, _ = sock.recvmsg(bufsize, CMSG_SPACE, MSG_CMSG_CLOEXEC)
    fds = parse_rights(ancdata)
    if msg_flags & MSG_CTRUNC:
        close_fds(fds)
        raise TransportError(
            f"ancillary data truncated (MSG_CTRUNC): descriptors were lost, closed {len(fds)}"
        )
    return data, fds


class HookClient:
    """QEMU's side of the hook, blocking: ``open()`` returns a descriptor.

    One request is in flight at a time (a lock serialises callers, as the
    patched QEMU's mutex does).  A refusal raises ``OSError`` with the
    broker's errno and the path, so callers handle it like a failed
    ``open(2)``.  A protocol violation by the broker, or a dead broker,
    raises :class:`ProtocolError` / :class:`TransportError` and leaves the
    client unusable (framing is lost).
    """

    def __init__(self, sock: socket.socket, *, timeout: float | None = 30.0) -> None:
        self._sock = sock
        self._timeout = timeout
        self._lock = threading.Lock()
        self._decoder = ReplyDecoder()
        self._broken: Exception | None = None

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> HookClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, path: str | bytes, flags: int, mode: int = 0) -> int:
        """Ask the broker to open ``path``; return the new fd (close-on-exec)."""
        frame = encode_request(path, flags, mode)
        shown = path if isinstance(path, str) else path.decode("utf-8", "surrogateescape")
        with self._lock:
            if self._broken is not None:
                raise TransportError(f"hook connection unusable: {self._broken}") from self._broken
            try:
                reply = self._exchange(frame, shown)
            except (ProtocolError, TransportError, WaitTimeout) as err:
                self._broken = err
                close_fds(self._decoder.take_fds())
                raise
        if reply.result < 0:
            code = -reply.result
            raise OSError(code, os.strerror(code), shown)
        assert reply.fd is not None
        return reply.fd

    def _exchange(self, frame: bytes, path: str) -> OpenReply:
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        try:
            send_frame(self._sock, frame)
        except OSError as err:
            raise TransportError(f"sending QEMU_OPEN for {path!r} to the broker: {err}") from err
        while True:
            event = self._decoder.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, OpenReply)
                return event
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    what = f"the broker's reply to QEMU_OPEN {path!r}"
                    raise WaitTimeout(what, self._timeout or 0)
                self._sock.settimeout(left)
            try:
                data, fds = recv_with_fds(self._sock)
            except TimeoutError as err:
                raise WaitTimeout(
                    f"the broker's reply to QEMU_OPEN {path!r}", self._timeout or 0
                ) from err
            except OSError as err:
                raise TransportError(f"receiving the reply for {path!r}: {err}") from err
            finally:
                if deadline is not None:
                    self._sock.settimeout(None)
            if not data:
                close_fds(fds)
                raise TransportError(f"the broker closed the connection before answering {path!r}")
            self._decoder.feed(data, fds)
