"""What one open request costs its server when the server's caches are cold.

Evidence for docs/bench.md ("Profile: where the hook's added time goes
inside QEMU").  Inside QEMU's ``blockdev-add`` the broker spends several
times the CPU per request that it spends in the back-to-back ping-pong:
between two requests QEMU and the harness run on the same core and evict
the broker's working set.  This script reproduces that without QEMU: one
client and each server (the project's broker, the C open-hook-server) pinned
to one core, and before every request the client does one of:

- ``hot``: nothing (the ping-pong);
- ``cache``: reads 8 MiB (evicts the caches, touches 2048 pages);
- ``pages``: reads one byte of each of 8192 pages (evicts TLB entries,
  only 512 KiB of cache lines);
- ``idle``: sleeps 300 us (the vCPU halts, as it does between QMP commands);
- ``switches``: pings 8 ``cat`` processes in turn (address-space switches,
  little memory touched).

It prints each server's CPU per request (from /proc/PID/task/*/schedstat)
and the client's round trip, medians of interleaved repetitions.  Run from
the checkout after ``make qemu``::

    .venv/bin/python docs/bench/cold-request.py [--reps 5] [--requests 1500]

Not project code: a measurement, kept so its figures can be checked.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from testbed.bench.brokerload import task_cpu_ns
from testbed.bench.client import one_op, reply_timeout
from testbed.bench.qemus import find_open_hook_server
from testbed.protocol.codec import encode_request

BIG = bytearray(64 << 20)
VIEW = memoryview(BIG)


def pinger(n: int) -> Callable[[], object]:
    """Round trips through ``n`` ``cat`` processes, one after the other."""
    peers = []
    for _ in range(n):
        ours, theirs = socket.socketpair()
        # cat ends when ours closes, at the script's exit
        subprocess.Popen(["cat"], stdin=theirs.fileno(), stdout=theirs.fileno())
        theirs.close()
        peers.append(ours)

    def ping() -> None:
        for sock in peers:
            sock.send(b"x")
            sock.recv(1)

    return ping


def modes() -> dict[str, Callable[[], object]]:
    return {
        "hot": lambda: None,
        "cache": lambda: bytes(VIEW[: 8 << 20]),
        "pages": lambda: bytes(VIEW[::4096][:8192]),
        "idle": lambda: time.sleep(0.0003),
        "switches": pinger(8),
    }


def servers(root: Path) -> dict[str, list[str]]:
    return {
        "broker": [sys.executable, "-m", "testbed", "broker", "--fd", "{fd}",
                   "--allow-ro", str(root), "--poll-us", "0"],
        "open-hook-server": [str(find_open_hook_server()), "--log", "/dev/null",
                             "--root", str(root), "--fd", "{fd}"],
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    ap.add_argument("--requests", type=int, default=1500, help="requests per cell (default 1500)")
    args = ap.parse_args()
    os.sched_setaffinity(0, {0})
    before_each = modes()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "f.img").write_bytes(bytes(4096))
        request = encode_request(str(root / "f.img"), os.O_RDONLY)
        running: dict[str, tuple[socket.socket, subprocess.Popen[bytes]]] = {}
        try:
            for name, argv in servers(root).items():
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                proc = subprocess.Popen(
                    [w.replace("{fd}", str(theirs.fileno())) for w in argv],
                    pass_fds=[theirs.fileno()], stderr=subprocess.DEVNULL,
                )  # fmt: skip
                theirs.close()
                reply_timeout(ours, 10)
                running[name] = (ours, proc)
                for _ in range(500):  # warm-up (and the broker's start-up)
                    one_op(ours, request)
            cells: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for _ in range(args.reps):
                for mode, before in before_each.items():
                    for name, (sock, proc) in running.items():
                        cpu0, wall = task_cpu_ns(proc.pid), 0
                        for _ in range(args.requests):
                            before()
                            t0 = time.perf_counter_ns()
                            one_op(sock, request)
                            wall += time.perf_counter_ns() - t0
                        us = (task_cpu_ns(proc.pid) - cpu0) / args.requests / 1000
                        cells.setdefault((mode, name), []).append((us, wall / args.requests / 1000))
        finally:
            for sock, proc in running.values():
                sock.close()
                proc.wait(10)
    head = ("before each request", "server", "server CPU us/req", "round trip us")
    print(f"{head[0]:20} {head[1]:17} {head[2]:>18} {head[3]:>14}")
    for (mode, name), v in cells.items():
        cpu_us = statistics.median(c for c, _ in v)
        trip_us = statistics.median(w for _, w in v)
        print(f"{mode:20} {name:17} {cpu_us:18.1f} {trip_us:14.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
