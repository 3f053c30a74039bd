"""``testbed bench``: the fd-passing benchmark."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from testbed.bench.placement import Placement


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="fd-passing throughput and latency: broker vs C limit, QMP add-fd, blockdev-add",
        description=(
            "Measure the broker over -open-hook-fd with 1..64 client processes against a C "
            "ping-pong (the kernel's limit), open+close in-process (the floor), pidfd_getfd, "
            "QMP add-fd, and blockdev-add in QEMU by path, by /dev/fdset and through the hook."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="short runs (about a minute)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write PNG plots into DIR")
    parser.add_argument(
        "--clients",
        metavar="N,N,...",
        help="client counts for the broker sweep (default 1,2,4,8,16,32,64)",
    )
    parser.add_argument(
        "--sweep-placement",
        choices=[p.value for p in Placement],
        help="CPU placement for the client sweep (default unpinned)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("build/bench"),
        help="where the C program is compiled and the test file lives (default build/bench)",
    )
    parser.set_defaults(func=run_command)


def parse_clients(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--clients {text!r}: not a list of integers") from err
    if not counts or any(n < 1 or n > 256 for n in counts):
        raise argparse.ArgumentTypeError(f"--clients {text!r}: counts must be 1..256")
    return counts


def run_command(args: argparse.Namespace) -> int:
    from testbed.bench import report, runner

    plan = runner.QUICK if args.quick else runner.FULL
    changes: dict[str, Any] = {"work_dir": args.work_dir}
    try:
        if args.clients:
            changes["clients"] = parse_clients(args.clients)
    except argparse.ArgumentTypeError as err:
        print(f"testbed bench: {err}", file=sys.stderr)
        return 2
    if args.sweep_placement:
        changes["sweep_placement"] = Placement(args.sweep_placement)
    plan = dataclasses.replace(plan, **changes)

    def log(message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    result = runner.run(plan, log)
    report.print_report(result)
    if args.json:
        report.write_json(result, args.json)
        log(f"wrote {args.json}")
    if args.plot:
        for path in report.write_plots(result, args.plot):
            log(f"wrote {path}")
    return 0
