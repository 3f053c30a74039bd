"""What serving costs: per-open time and QEMU's start-up, native vs supervised.

``python -m testbed.supervise.measure --loop-helper PATH`` prints the
figures docs/supervise.md quotes.  The per-open figure needs a program that
runs an ``openat``+``close`` loop and prints ``median_ns=N`` (the test
helper's ``loop`` command, tests/supervise/helper.c); QEMU's start-up is
the time from starting the process to its QMP greeting on ``-qmp stdio``.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from testbed.broker import Policy
from testbed.errors import MeasureError, WaitTimeout
from testbed.qemu import STOCK_QEMU
from testbed.supervise.supervisor import Supervisor

Start = Callable[[list[str]], tuple[subprocess.Popen[bytes], Supervisor | None]]


def _plain(argv: list[str]) -> tuple[subprocess.Popen[bytes], Supervisor | None]:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return proc, None


def _supervised(*, landlock: bool) -> Start:
    def start(argv: list[str]) -> tuple[subprocess.Popen[bytes], Supervisor | None]:
        sup = Supervisor(Policy(), landlock=landlock, keep_records=False)
        proc = sup.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return proc, sup

    return start


def greeting_ms(start: Start, binary: Path = STOCK_QEMU, timeout: float = 30.0) -> float:
    """Milliseconds from starting QEMU to the first byte of its QMP greeting."""
    argv = [str(binary), "-nodefaults", "-display", "none", "-machine", "none", "-qmp", "stdio"]
    t0 = time.perf_counter()
    proc, sup = start(argv)
    assert proc.stdout is not None and proc.stdin is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        raise WaitTimeout("QEMU's QMP greeting", timeout)
    os.read(proc.stdout.fileno(), 1)
    elapsed = (time.perf_counter() - t0) * 1e3
    proc.kill()
    proc.wait()
    if sup is not None:
        sup.close()
    return elapsed


def open_ns(helper: Path, path: str, n: int, *, supervised: bool) -> int:
    """The helper's median ns for one openat+close of ``path``."""
    argv = [str(helper), "loop", path, str(n)]
    if supervised:
        sup = Supervisor(Policy.from_grants(ro=[path]), keep_records=False)
        proc = sup.popen(argv, stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=600)
        sup.close()
    else:
        out = subprocess.run(argv, stdout=subprocess.PIPE, check=True, timeout=600).stdout
    for line in out.decode().splitlines():
        if line.startswith("median_ns="):
            return int(line.split("=", 1)[1])
    raise MeasureError(f"{helper} loop printed no median: {out!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--loop-helper", type=Path, help="a program with a 'loop PATH N' command")
    p.add_argument("--opens", type=int, default=20000)
    p.add_argument("--starts", type=int, default=15)
    args = p.parse_args(argv)
    if args.loop_helper:
        target = "/etc/hostname"
        native = open_ns(args.loop_helper, target, args.opens, supervised=False)
        served = open_ns(args.loop_helper, target, args.opens, supervised=True)
        print(
            f"openat+close median: native {native / 1e3:.1f} us, supervised {served / 1e3:.1f} us"
        )
    starts: dict[str, Start] = {
        "plain": _plain,
        "supervised": _supervised(landlock=False),
        "supervised+landlock": _supervised(landlock=True),
    }
    runs: dict[str, list[float]] = {name: [] for name in starts}
    # Round-robin, so that a busy moment of the machine costs each kind alike.
    for _ in range(args.starts):
        for name, start in starts.items():
            runs[name].append(greeting_ms(start))
    plain = statistics.median(runs["plain"])
    for name, values in runs.items():
        med = statistics.median(values)
        print(
            f"QEMU start to QMP greeting, {name}: median {med:.1f} ms "
            f"({med / plain:.2f}x plain, {len(values)} runs)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
