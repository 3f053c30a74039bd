#!/usr/bin/env python3
"""The broker's CPU time per request, this tree against a baseline tree, same run.

One client (this process) and one broker process (``python -m testbed
broker --fd N``), both pinned to the same core, the client asking for a
regular file and closing the fd it gets, one request at a time as QEMU
does.  The broker's own CPU time comes from /proc/PID/schedstat (ns), read
after a warm-up and after ``--requests`` requests.  Variants are run in
interleaved repetitions (the order alternating) so that a busy machine
weighs on each alike; medians are printed, and the ratio to the baseline.

    git archive main testbed | tar -x -C /tmp/broker-main
    .venv/bin/python scripts/broker_cost.py --baseline /tmp/broker-main
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.transport import HookClient


def cpu_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def run_once(tree: str | None, grant: str, requests: int, audit: str | None, cpu: int) -> float:
    """Broker CPU microseconds per request for one broker process."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if tree:
        env["PYTHONPATH"] = tree
    ours, theirs = socket.socketpair()
    argv = [sys.executable, "-m", "testbed", "broker", "--fd", str(theirs.fileno())]
    argv += ["--allow-ro", grant] + (["--audit", audit] if audit else [])
    proc = subprocess.Popen(
        ["taskset", "-c", str(cpu), *argv],
        pass_fds=[theirs.fileno()],
        env=env,
        cwd=grant,  # not a source tree: python -m puts the cwd first on sys.path
        stderr=subprocess.DEVNULL,
    )
    theirs.close()
    client = HookClient(ours, timeout=30)
    target = os.path.join(grant, "disk.img")
    for _ in range(500):
        os.close(client.open(target, os.O_RDONLY))
    start = cpu_ns(proc.pid)
    for _ in range(requests):
        os.close(client.open(target, os.O_RDONLY))
    used = cpu_ns(proc.pid) - start
    client.close()
    proc.wait(timeout=30)
    return used / requests / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--baseline", metavar="DIR", required=True, help="the baseline tree")
    parser.add_argument("--reps", type=int, default=7, help="repetitions per variant (7)")
    parser.add_argument("--requests", type=int, default=5000, help="requests per run (5000)")
    parser.add_argument("--cpu", type=int, default=0, help="the core both sides run on (0)")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.cpu})
    variants = [("baseline", args.baseline), ("this tree", None)]
    with tempfile.TemporaryDirectory() as grant:
        Path(grant, "disk.img").write_bytes(b"x" * 4096)
        for audit in (False, True):
            results: dict[str, list[float]] = {label: [] for label, _ in variants}
            for rep in range(args.reps):
                order = variants if rep % 2 == 0 else variants[::-1]
                for label, tree in order:
                    log = os.path.join(grant, f"audit-{rep}-{label}.jsonl") if audit else None
                    results[label].append(run_once(tree, grant, args.requests, log, args.cpu))
                    if log:
                        os.unlink(log)
            base = statistics.median(results["baseline"])
            new = statistics.median(results["this tree"])
            what = "with an audit log" if audit else "no audit log"
            print(
                f"broker CPU per request, {what}, median of {args.reps} x {args.requests}"
                f" (one client, same core {args.cpu}):"
            )
            for label, values in results.items():
                print(
                    f"  {label:10} {statistics.median(values):6.1f} us"
                    f"  (runs: {', '.join(f'{v:.1f}' for v in values)})"
                )
            print(f"  ratio      {new / base:.3f}  ({(new / base - 1) * 100:+.1f}%)")
    print(time.strftime("measured %Y-%m-%d %H:%M UTC", time.gmtime()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
