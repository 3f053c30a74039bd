"""The Python floor: the broker's per-request system calls in the leanest Python loop.

No policy, no codec objects, no audit: one connection, and per request the
steps of a program derived from an strace of the broker
(:mod:`testbed.bench.syscalls`), each a prebuilt closure, so what it costs
is what Python itself costs to issue those calls here.  The filename is
taken from the request frame by slicing (the grant's root is cut off its
front); a reply always carries the fd opened last.

Run as its own process, like the broker::

    python -m testbed.bench.pyfloor --fd N --root DIR --program JSON
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import select
import socket
import struct
import sys
from collections.abc import Callable, Sequence

from testbed.bench.syscalls import Kind, Program, Step
from testbed.errors import SyscallTraceError

SYS_OPENAT2 = 437
REPLY_OK = struct.pack("=IIi", 12, 1, 0)
REQUEST_FIXED = 18
RECV_SIZE = 4096


class OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


class _Eof(Exception):
    """The client hung up: the loop ends."""


def _openat2() -> Callable[..., int]:
    libc = ctypes.CDLL(None, use_errno=True)
    proto = ctypes.CFUNCTYPE(
        ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_char_p,
        ctypes.POINTER(OpenHow), ctypes.c_size_t, use_errno=True,
    )  # fmt: skip
    call = proto(("syscall", libc))
    size = ctypes.sizeof(OpenHow)

    def openat2(dirfd: int, name: bytes, how: OpenHow) -> int:
        fd: int = call(SYS_OPENAT2, dirfd, name, how, size)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), name)
        return fd

    return openat2


def build(program: Program, sock: socket.socket, root: str) -> list[Callable[[], None]]:
    """One closure per step, sharing the request's data and descriptors."""
    fds: dict[str, int] = {"sock": sock.fileno()}
    data = [b""]
    cut = REQUEST_FIXED + len(os.fsencode(root.rstrip("/"))) + 1
    ep = select.epoll()
    ep.register(sock.fileno(), select.EPOLLIN)
    if any(s.target == "root" or s.fd == "root" for s in program):
        fds["root"] = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    openat2 = _openat2()
    steps: list[Callable[[], None]] = []
    for step in program:
        steps.append(_closure(step, sock, ep, fds, data, cut, openat2))
    return steps


def _closure(
    step: Step, sock: socket.socket, ep: select.epoll, fds: dict[str, int], data: list[bytes],
    cut: int, openat2: Callable[..., int],
) -> Callable[[], None]:  # fmt: skip
    """The closure that issues ``step``, with everything it needs bound beforehand.

    Long because it is one small closure per :class:`Kind`, each binding its
    call and arguments to locals so that the timed loop does no lookups;
    a table of factories would only move the same branches apart.
    """
    k, role, flags, target = step.kind, step.fd, step.flags, step.target
    if k is Kind.WAIT:
        poll = ep.poll

        def wait() -> None:
            poll()

        return wait
    if k is Kind.RECV:
        recvmsg = sock.recvmsg

        def recv() -> None:
            got = recvmsg(RECV_SIZE, 0, flags)[0]
            if not got:
                raise _Eof
            data[0] = got

        return recv
    if k is Kind.OPENAT2:
        how = OpenHow(flags, 0, step.resolve)

        def open2() -> None:
            fds[role] = openat2(fds[target], data[0][cut:], how)

        return open2
    if k is Kind.REOPEN:
        # relative to a dirfd of /proc/self/fd, held for the run, as the broker does
        proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

        def reopen() -> None:
            fds[role] = os.open(str(fds[target]), flags, dir_fd=proc_fd)

        return reopen
    if k is Kind.FSTAT:
        fstat = os.fstat

        def stat() -> None:
            fstat(fds[role])

        return stat
    if k is Kind.FCNTL:
        command = step.command
        call = fcntl.fcntl

        def fcntl_() -> None:
            call(fds[role], command, flags)

        return fcntl_
    if k is Kind.SEND:
        sendmsg = sock.sendmsg
        level, kind = socket.SOL_SOCKET, socket.SCM_RIGHTS

        def send() -> None:
            anc = [(level, kind, struct.pack("i", fds[target]))] if target else []
            sendmsg([REPLY_OK], anc, flags)

        return send
    if k is Kind.CLOSE:
        close = os.close

        def close_() -> None:
            close(fds[role])

        return close_
    raise SyscallTraceError(f"the floor has no step for {k}")  # pragma: no cover - enum is total


def serve(steps: Sequence[Callable[[], None]]) -> int:
    """Run the steps until the client hangs up; the number of requests served."""
    served = 0
    try:
        while True:
            for step in steps:
                step()
            served += 1
    except _Eof:
        return served


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.bench.pyfloor",
        description="Serve one inherited -open-hook-fd socket with the broker's system calls "
        "and nothing else (the benchmark's Python floor).",
    )
    parser.add_argument("--fd", type=int, required=True, help="the connected socket inherited")
    parser.add_argument("--root", required=True, help="directory every requested file is under")
    parser.add_argument("--program", required=True, help="the per-request steps, as JSON")
    args = parser.parse_args(argv)
    try:
        program = tuple(Step.from_json(d) for d in json.loads(args.program))
    except (ValueError, TypeError, SyscallTraceError) as err:
        print(f"pyfloor: --program: {err}", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=args.fd)
    sock.setblocking(True)
    try:
        serve(build(program, sock, args.root))
    except OSError as err:
        print(f"pyfloor: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
