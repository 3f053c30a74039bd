"""``testbed bench``: fd passing and what users feel of it, against floors, as ratios."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from testbed.bench.qemus import DEFAULT_VERSION

DESCRIPTION = """\
Measure fd passing over -open-hook-fd and what it costs QEMU, as ratios taken in
one run with the compared transports interleaved repetition by repetition.

experiments (in order):
  pingpong  one client vs the broker, the Python floor (the broker's syscalls,
            from strace), the C open-hook-server and a C ping-pong; per placement;
            and the seccomp supervisor serving a C child's openat+close loop
  sweep     the broker with N clients (unpinned; 1 and 64 also same-core)
  handover  the broker vs QMP add-fd + remove-fd, one fd per op, on every QEMU version
  blockdev  blockdev-add of a file node by path, fd set, hook (Python, C), seccomp,
            on every QEMU version, interleaved; then a CPU pass: what QEMU and
            the process serving its opens each spent per blockdev-add
  startup   QEMU -S start to QMP greeting vs backing chain depth (plain, hook,
            fd sets, supervised, supervised + Landlock)
  snapshot  blockdev-snapshot-sync latency per transport
  storm     1, 4, 16 QEMUs started at once: one broker daemon vs by path

Each ratio is the median of per-repetition ratios, with its min-max; a ratio
measured on several QEMU versions is KEY for the first version and KEY@VERSION
for each other one.  --check-syscalls only traces the broker and the floor and
compares their system calls per request (rerun it whenever the broker changes)."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="fd-passing costs: broker vs Python floor and C, QEMU start-up, blockdev-add, storms",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION,
    )
    _add_what_options(parser)
    _add_output_options(parser)
    parser.set_defaults(func=run_command)


def _add_what_options(parser: argparse.ArgumentParser) -> None:
    """What to measure, how often, and where."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 repetitions, short rounds: every ratio in under a minute",
    )
    parser.add_argument("--reps", type=int, metavar="N", help="repetitions (default 7; quick 3)")
    parser.add_argument("--only", metavar="EXP,EXP", help="run only these experiments")
    parser.add_argument(
        "--transports", metavar="T,T", help="QEMU transports to run (default: every registered one)"
    )
    parser.add_argument(
        "--clients", metavar="N,N,...", help="client counts for the sweep (1 and 64 are always in)"
    )
    parser.add_argument(
        "--qemu-version",
        metavar="V,V",
        help="QEMU versions to measure, the first one for the plain ratio keys "
        f"(default: every built version, {DEFAULT_VERSION} first; blockdev and handover "
        "run on all of them, the other experiments on the first)",
    )
    parser.add_argument(
        "--qemu-placement",
        choices=["same-core", "unpinned"],
        default="same-core",
        help="where the harness, QEMU and its broker run for blockdev, startup and snapshot "
        "(default same-core: all on the first CPU, since waking an idle vCPU here costs more "
        "than the hook's work; blockdev is then measured unpinned too, as information; the "
        "storm and the handover always run unpinned)",
    )
    parser.add_argument(
        "--check-syscalls",
        action="store_true",
        help="compare the floor's per-request syscalls with the broker's, and exit",
    )


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """Where the results and the working files go."""
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="measure nothing: read a run saved with --json and print, plot and write it "
        "(--plot, --markdown) as that run would have",
    )
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write PNG plots into DIR")
    parser.add_argument(
        "--markdown",
        type=Path,
        action="append",
        metavar="FILE",
        help="write the results as markdown (repeatable); in a FILE with the results markers "
        "(docs/bench.md) only that section is replaced, in one with the ratios markers "
        "(README.md) only the ratios table",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("build/bench"),
        help="C program, chains and files go here (default build/bench)",
    )


def parse_list(text: str, option: str, *, known: list[str] | None = None) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"{option} {text!r}: empty list")
    if known is not None:
        bad = [x for x in items if x not in known]
        if bad:
            raise argparse.ArgumentTypeError(
                f"{option}: unknown {', '.join(bad)} (known: {', '.join(known)})"
            )
    return items


def parse_clients(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--clients {text!r}: not a list of integers") from err
    if not counts or any(n < 1 or n > 256 for n in counts):
        raise argparse.ArgumentTypeError(f"--clients {text!r}: counts must be 1..256")
    return counts


def plan_from(args: argparse.Namespace) -> Any:
    from testbed.bench.experiments import EXPERIMENTS
    from testbed.bench.placement import Placement
    from testbed.bench.plan import FULL, QUICK
    from testbed.bench.qemus import default_versions, versions
    from testbed.bench.transports import TRANSPORTS

    plan = QUICK if args.quick else FULL
    changes: dict[str, Any] = {"qemu_placement": Placement(args.qemu_placement)}
    if args.qemu_version:
        wanted = parse_list(args.qemu_version.replace(" ", ","), "--qemu-version", known=versions())
        changes["qemu_versions"] = tuple(dict.fromkeys(wanted))  # once each, in order
    else:
        changes["qemu_versions"] = default_versions()
    if args.reps is not None:
        if args.reps < 1:
            raise argparse.ArgumentTypeError(f"--reps {args.reps}: need at least 1")
        changes["reps"] = args.reps
    if args.only:
        changes["experiments"] = parse_list(args.only, "--only", known=EXPERIMENTS.names())
    if args.transports:
        changes["transports"] = parse_list(
            args.transports, "--transports", known=TRANSPORTS.names()
        )
    if args.clients:
        changes["clients"] = parse_clients(args.clients)
    return dataclasses.replace(plan, **changes)


def check_syscalls(work_dir: Path) -> int:
    from testbed.bench.env import Env
    from testbed.bench.runner import derive_floor, make_file
    from testbed.bench.servers import floor_argv
    from testbed.bench.syscalls import compare, per_request, trace_server
    from testbed.errors import SyscallTraceError

    file = make_file(work_dir / "files")
    try:
        broker = derive_floor(file)
        env = Env(
            work_dir=work_dir,
            file=file,
            warmup=0,
            qemu_version=DEFAULT_VERSION,
            floor_program=broker.program,
        )
        floor = per_request(trace_server(floor_argv(env), file=file))
    except SyscallTraceError as err:
        print(f"testbed bench --check-syscalls: {err}", file=sys.stderr)
        return 1
    print(f"broker, per request ({broker.matching} of {broker.segments} requests alike):")
    for step in broker.program:
        print(f"  {step.label()}")
    diff = compare(broker.program, floor.program)
    if diff:
        print("the Python floor issues different system calls:", *diff, sep="\n  ")
        return 1
    print(f"python_floor issues the same ({floor.matching} of {floor.segments} requests alike)")
    return 0


def run_command(args: argparse.Namespace) -> int:
    from testbed.bench import report, runner

    if args.check_syscalls:
        return check_syscalls(args.work_dir)

    def log(message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    if args.from_json:
        from testbed.bench import saved
        from testbed.errors import BenchUsageError

        try:
            result = saved.load(args.from_json)
        except BenchUsageError as err:
            print(f"testbed bench: --from-json {err}", file=sys.stderr)
            return 2
    else:
        try:
            plan = plan_from(args)
        except argparse.ArgumentTypeError as err:
            print(f"testbed bench: {err}", file=sys.stderr)
            return 2
        result = runner.run(plan, args.work_dir, log)
    report.print_report(result)
    if args.json:
        report.write_json(result, args.json)
        log(f"wrote {args.json}")
    if args.plot:
        for path in report.write_plots(result, args.plot):
            log(f"wrote {path}")
    for path in args.markdown or ():
        report.write_markdown(result, path)
        log(f"wrote the results section of {path}")
    return 0
