"""SCM_RIGHTS transport: descriptors are handed over or closed, never leaked."""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest

from testbed.errors import ProtocolError, TransportError, WaitTimeout
from testbed.protocol import encode_reply
from testbed.transport import HookClient, recv_with_fds, send_frame
from tests.conftest import open_fds


def fake_broker(reply: bytes, fds: list[int]) -> tuple[socket.socket, threading.Thread]:
    """A peer that reads one request and answers with ``reply`` and ``fds``."""
    a, b = socket.socketpair()

    def serve() -> None:
        b.recv(4096)
        send_frame(b, reply, fds)

    t = threading.Thread(target=serve)
    t.start()
    return a, t


def test_fd_round_trip(tmp_path: object) -> None:
    r, w = os.pipe()
    sock, t = fake_broker(encode_reply(0), [r])
    fd = HookClient(sock).open("/x", os.O_RDONLY)
    t.join()
    os.write(w, b"ok")
    assert os.read(fd, 2) == b"ok"
    assert os.get_inheritable(fd) is False  # received with MSG_CMSG_CLOEXEC
    for x in (fd, r, w):
        os.close(x)
    sock.close()


def test_errno_reply_is_oserror_naming_the_path() -> None:
    sock, t = fake_broker(encode_reply(-13), [])
    with pytest.raises(PermissionError) as info:
        HookClient(sock).open("/secret/disk", os.O_RDWR)
    t.join()
    assert info.value.filename == "/secret/disk"
    sock.close()


@pytest.mark.parametrize("nfds", [0, 2, 3])
def test_wrong_fd_count_closes_everything(nfds: int) -> None:
    before = open_fds()
    pipes = [os.pipe() for _ in range(nfds)]
    sock, t = fake_broker(encode_reply(0), [r for r, _ in pipes])
    client = HookClient(sock)
    with pytest.raises(ProtocolError):
        client.open("/x", 0)
    t.join()
    for r, w in pipes:
        os.close(r)
        os.close(w)
    with pytest.raises(TransportError, match="unusable"):
        client.open("/x", 0)
    sock.close()
    assert open_fds() == before


def test_ctrunc_closes_what_arrived() -> None:
    a, b = socket.socketpair()
    pipes = [os.pipe() for _ in range(12)]  # more than the receive buffer has room for
    send_frame(b, b"x", [r for r, _ in pipes])
    before_recv = open_fds()
    with pytest.raises(TransportError, match="MSG_CTRUNC"):
        recv_with_fds(a)
    assert open_fds() == before_recv
    for r, w in pipes:
        os.close(r)
        os.close(w)
    a.close()
    b.close()


def test_dead_broker_is_a_transport_error() -> None:
    a, b = socket.socketpair()
    b.close()
    with pytest.raises(TransportError):
        HookClient(a).open("/x", 0)
    a.close()


def test_silent_broker_times_out_naming_the_request() -> None:
    a, b = socket.socketpair()
    with pytest.raises(WaitTimeout, match="/slow/disk"):
        HookClient(a, timeout=0.2).open("/slow/disk", 0)
    a.close()
    b.close()


def test_reply_split_across_reads() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()

    def serve() -> None:
        b.recv(4096)
        reply = struct.pack("=IIi", 12, 1, 0)
        send_frame(b, reply[:3], [r])
        b.sendall(reply[3:])

    t = threading.Thread(target=serve)
    t.start()
    fd = HookClient(a).open("/x", 0)
    t.join()
    for x in (fd, r, w):
        os.close(x)
    a.close()
    b.close()
