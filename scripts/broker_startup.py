#!/usr/bin/env python3
"""Time from exec of ``testbed broker --fd N`` to its first answered request.

A hooked QEMU starts the broker and its first open waits for it, so this is
the latency a launch pays.  Each variant is started ``--reps`` times,
interleaved (so a busy machine slows them all alike), and the medians are
printed.  A variant is a label and a source tree: ``--baseline DIR`` adds
the tree in DIR (for example ``git archive main testbed | tar -x -C DIR``)
run through PYTHONPATH, which comes before the editable install.

Every variant runs twice: with byte code cached (``.pyc`` written once to a
private PYTHONPYCACHEPREFIX and reused, as on a normal install) and with
PYTHONDONTWRITEBYTECODE=1 (every module compiled at every start).

    .venv/bin/python scripts/broker_startup.py --baseline /tmp/broker-main
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


def first_answer(argv: list[str], env: dict[str, str], grant: str, target: str) -> float:
    ours, theirs = socket.socketpair()
    fd = theirs.fileno()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*argv, "--fd", str(fd), "--allow-ro", grant],
        pass_fds=[fd],
        env=env,
        cwd=grant,  # not the worktree: python -m puts the cwd first on sys.path
        stderr=subprocess.DEVNULL,
    )
    theirs.close()
    client = HookClient(ours, timeout=30)
    os.close(client.open(target, os.O_RDONLY))
    elapsed = time.perf_counter() - start
    client.close()
    proc.wait(timeout=30)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--reps", type=int, default=20, help="starts per variant (default 20)")
    parser.add_argument("--baseline", metavar="DIR", help="also time the testbed tree in DIR")
    args = parser.parse_args()
    py = sys.executable
    clean = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")
    }
    cache = tempfile.mkdtemp(prefix="pyc-")
    envs = {
        "pyc": {**clean, "PYTHONPYCACHEPREFIX": cache},
        "no pyc": {**clean, "PYTHONDONTWRITEBYTECODE": "1"},
    }
    commands: list[tuple[str, list[str], dict[str, str]]] = []
    if args.baseline:
        base = {"PYTHONPATH": args.baseline}
        commands.append(
            ("baseline: python -m testbed broker", [py, "-m", "testbed", "broker"], base)
        )
    commands += [
        ("python -m testbed broker", [py, "-m", "testbed", "broker"], {}),
        ("python -m testbed.broker", [py, "-m", "testbed.broker"], {}),
        ("python -c pass (interpreter floor)", [py, "-c", "pass"], {}),
    ]
    variants = [
        (f"{label} [{kind}]", argv, {**env, **extra})
        for kind, env in envs.items()
        for label, argv, extra in commands
    ]
    times: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    with tempfile.TemporaryDirectory() as grant:
        target = os.path.join(grant, "disk.img")
        Path(target).write_bytes(b"x")
        for label, argv, env in variants:  # fills the byte-code cache
            if "[pyc]" in label and argv[-1] != "pass":
                first_answer(argv, env, grant, target)
        for _ in range(args.reps):
            for label, argv, env in variants:
                if argv[-1] == "pass":
                    start = time.perf_counter()
                    subprocess.run(argv, env=env, check=True)
                    times[label].append(time.perf_counter() - start)
                else:
                    times[label].append(first_answer(argv, env, grant, target))
    print(f"exec to first answered request, median of {args.reps} (min, max), ms:")
    for label, values in times.items():
        print(
            f"  {label:50} {statistics.median(values) * 1e3:7.1f}"
            f"  ({min(values) * 1e3:.1f}, {max(values) * 1e3:.1f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
