"""A lean -open-hook-fd client loop, run in its own process by the harness.

The request frame is encoded once with the project's codec; each op is one
``sendall``, one ``recvmsg`` and one ``close``, so the client costs as
little as Python allows and the figure measures the broker.  A reply that
is not a success with exactly one fd stops the run with an error naming it:
a benchmark must not count refusals as fast opens.

The harness drives a client over a ``multiprocessing`` connection::

    client -> harness   ("ready", None)            connected, warm-up done
    harness -> client   ("go", start_ns, stop_ns)   CLOCK_MONOTONIC times
    client -> harness   ("done", (ops, seconds, latencies as bytes of array("Q")))
    harness -> client   ("exit", 0, 0)
    client -> harness   ("error", message)          at any point, then it exits
"""

from __future__ import annotations

import array
import os
import socket
import struct
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from testbed.bench.placement import pin
from testbed.errors import ReplyError
from testbed.protocol import QEMU_OPEN, REPLY_SIZE, encode_request

OK_REPLY = struct.pack("=IIi", REPLY_SIZE, QEMU_OPEN, 0)
ANC_SIZE = socket.CMSG_SPACE(struct.calcsize("i"))


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    socket_path: str | None  # connect here, or
    fd: int | None  # use this inherited connected socket
    file: str
    warmup: int
    cpu: int | None
    timeout: float = 10.0  # per reply: a stuck broker must not hang the bench


def one_op(sock: socket.socket, frame: bytes) -> None:
    """Send ``frame``, receive the fd, close it."""
    sock.sendall(frame)
    data, anc, flags, _ = sock.recvmsg(REPLY_SIZE, ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
    fds = [
        fd
        for level, kind, raw in anc
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
        for fd in array.array("i", raw[: len(raw) - len(raw) % 4])
    ]
    for fd in fds:
        os.close(fd)
    if data != OK_REPLY or len(fds) != 1 or flags & socket.MSG_CTRUNC:
        detail = struct.unpack("=IIi", data)[2] if len(data) == REPLY_SIZE else data
        raise ReplyError(f"reply {detail!r} with {len(fds)} fd(s), flags {flags:#x}")


def reply_timeout(sock: socket.socket, seconds: float) -> None:
    """A blocking socket whose sends and receives give up after ``seconds`` (EAGAIN).

    Not ``settimeout``: Python then polls before every call, two more system
    calls per op that the client's CPU would add to every latency.
    """
    sock.settimeout(None)
    whole = int(seconds)
    tv = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def serve_harness(conn: Connection, config: ClientConfig) -> None:
    """Body of a client process: connect, warm up, run timed rounds until told to exit."""
    try:
        pin(0, config.cpu)
        if config.fd is not None:
            sock = socket.socket(fileno=config.fd)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(config.timeout)
            sock.connect(str(config.socket_path))
        reply_timeout(sock, config.timeout)
        frame = encode_request(config.file, os.O_RDONLY, 0)
        for _ in range(config.warmup):
            one_op(sock, frame)
        conn.send(("ready", None))
        while True:
            command, start_ns, stop_ns = conn.recv()
            if command != "go":
                break
            conn.send(("done", timed_round(sock, frame, start_ns, stop_ns)))
        sock.close()
    except BlockingIOError:  # SO_RCVTIMEO / SO_SNDTIMEO ran out
        conn.send(("error", f"the server did not answer within {config.timeout:g}s"))
    except Exception as err:  # reported to the harness, which raises it there
        conn.send(("error", f"{type(err).__name__}: {err}"))


def timed_round(
    sock: socket.socket, frame: bytes, start_ns: int, stop_ns: int
) -> tuple[int, float, bytes]:
    """Ops from ``start_ns`` until ``stop_ns``: (count, seconds, latencies)."""
    now = time.monotonic_ns
    wait = (start_ns - now()) / 1e9
    if wait > 0:
        time.sleep(wait)
    latencies = array.array("Q")
    record = latencies.append
    t0 = begin = now()
    t1 = t0
    while t1 < stop_ns:
        one_op(sock, frame)
        t1 = now()
        record(t1 - t0)
        t0 = t1
    return len(latencies), (t1 - begin) / 1e9, latencies.tobytes()
