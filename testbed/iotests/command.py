"""``testbed iotests``: QEMU's own tests/qemu-iotests with every qemu-system open hooked."""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any

from testbed.errors import IotestsError

DESCRIPTION = """\
Run QEMU's own iotests (tests/qemu-iotests/check of the source each QEMU
build came from) with QEMU_PROG set to a wrapper per mode, and compare:

  unhooked    the patched qemu-system, no -open-hook-fd (the reference)
  hooked      the patched qemu-system; the wrapper starts `testbed broker --fd`
              on a socketpair (grants: the suite's TEST_DIR and SOCK_DIR,
              create, symlinks allowed) and execs QEMU with -open-hook-fd,
              argv[0] kept so the suite's filters still match
  supervised  stock qemu-system under `testbed supervise` (seccomp); shown as
              not run, with the reason, until that command exists

Each test runs on its own (check -tap -FMT TEST) with a timeout, its own
TEST_DIR and its own broker audit file; progress is printed as tests finish.
The goal: every test that passes unhooked passes hooked.  A failed test is run
once more (--retries) before it counts.  Exit status 1 when a test passed
unhooked and failed in another mode with a change no known divergence
(testbed/iotests/divergences.py) accounts for; 2 when nothing could run.
"""

EPILOG = """\
default selection: every test of the suite that starts qemu-system (bash tests
calling $QEMU or _launch_qemu, Python tests building iotests.VM), less the
'disabled' group and the tests docs/iotests.md lists with their reasons, each
run once with the first --format it supports.

examples:
  testbed iotests                                   # everything, every build and mode
  testbed iotests --mode hooked 051 153             # two tests, hooked only
  testbed iotests --list                            # the plan, and what is left out
  testbed iotests --format raw --json r.json --report build/iotests/report
"""

#: build/iotests of the checkout (no import of testbed.qemu here: the CLI imports
#: every command module, and `testbed broker` should start fast).
_WORK = Path(__file__).resolve().parents[2] / "build" / "iotests"


def _csv(value: str) -> list[str]:
    return [v for v in (x.strip() for x in value.split(",")) if v]


def register(sub: Any) -> None:
    """The ``iotests`` sub-command and its options.

    Longer than 60 lines on purpose: one flat list of options, in the order ``--help`` shows
    them.
    """
    from testbed.iotests.modes import MODE_HELP
    from testbed.iotests.selection import DEFAULT_FORMATS

    p: argparse.ArgumentParser = sub.add_parser(
        "iotests",
        help="QEMU's own iotests, hooked vs unhooked (vs supervised)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--qemu-version",
        type=_csv,
        action="extend",
        default=[],
        metavar="V",
        help="only these versions, e.g. 7.2 or 7.2,10.0 (default: every build under build/qemu*)",
    )
    p.add_argument(
        "--qemu-build",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="run these patched builds (a cache entry or build/qemu/<v>/patched, with "
        "info.json and bin/) instead of the ones linked in the checkout",
    )
    p.add_argument(
        "--broker",
        type=Path,
        metavar="TESTBED",
        help="the `testbed` executable whose `broker --fd` the hooked wrapper starts "
        "(default: this checkout's)",
    )
    p.add_argument(
        "--supervisor",
        type=Path,
        metavar="TESTBED",
        help="the `testbed` executable whose `supervise` runs stock QEMU in mode supervised "
        "(default: this checkout's, when it has the command)",
    )
    p.add_argument(
        "--mode",
        type=_csv,
        action="extend",
        default=[],
        metavar="MODE",
        help="modes, comma-separated (default: all: "
        + "; ".join(f"{m.value}: {h}" for m, h in MODE_HELP.items())
        + ")",
    )
    p.add_argument(
        "--format",
        type=_csv,
        default=list(DEFAULT_FORMATS),
        metavar="FMT,...",
        help="image formats in order of preference; each test runs with the first it "
        "supports that the build has (-drive format=help) "
        f"(default: {','.join(DEFAULT_FORMATS)})",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write every result as JSON")
    p.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="write DIR/iotests.md (default: build/iotests/report)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds one test may take before it is killed and failed (default 600)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        metavar="N",
        help="run a failed test again up to N times; a pass on retry is reported as flaky "
        "(default 1: the machine is shared and some tests race under load)",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=_WORK,
        metavar="DIR",
        help="where the suite's tree, wrappers and per-test runs go (default: build/iotests)",
    )
    p.add_argument("--list", action="store_true", help="print the plan and what is left out")
    p.add_argument(
        "--from-json",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="run nothing: write the report (and --json) from earlier result files, "
        "merged (e.g. one per version, or a run cut short)",
    )
    p.add_argument(
        "tests", nargs="*", metavar="TEST", help="iotests by name (default: the selection)"
    )
    p.set_defaults(func=run)


def _from_json(args: argparse.Namespace) -> int:
    from testbed.iotests.modes import Mode
    from testbed.iotests.report import unexplained, write_report
    from testbed.iotests.results import TestRun, read_json, write_json

    runs: list[TestRun] = []
    meta: dict[str, Any] = {}
    for path in args.from_json:
        try:
            more, m = read_json(path)
        except IotestsError as err:
            print(f"testbed iotests: {err}", file=sys.stderr)
            return 2
        runs += more
        meta.update({f"{k} ({path.name})" if k in meta else k: v for k, v in m.items()})
    if args.json:
        write_json(args.json, runs, meta)
    report = write_report(args.report or args.work / "report", runs, meta, [])
    print(f"report:  {report}", file=sys.stderr)
    bad = [f for m in Mode if m is not Mode.UNHOOKED for f in unexplained(runs, m.value)]
    return 1 if bad else 0


class _Progress:
    """Prints each result as it comes, and keeps the JSON file up to date."""

    def __init__(self, json_path: Path, meta: dict[str, Any]) -> None:
        self.json_path = json_path
        self.meta = meta
        self.runs: list[Any] = []

    def add(self, r: Any, n: int, total: int) -> None:
        from testbed.iotests.results import Status, write_json

        self.runs.append(r)
        extra = f" launches={r.launches}"
        if r.requests:
            extra += f" requests={r.requests} refused={len(r.refusals)}"
        if r.brokers_left:
            extra += f" BROKERS-LEFT={r.brokers_left}"
        why = f" ({r.reason[:100]})" if r.reason and r.status is not Status.PASS else ""
        if r.attempts > 1:
            why += f" [attempt {r.attempts}; before: {r.earlier_failures[0].splitlines()[0]}]"
        print(
            f"[{n}/{total}] {r.version} {r.mode:10} {r.format:6} {r.test:24} "
            f"{r.status.value:7} {r.seconds:6.1f}s{extra}{why}",
            flush=True,
        )
        write_json(self.json_path, self.runs, self.meta)


def run(args: argparse.Namespace) -> int:
    """``testbed iotests``: check the arguments, pick the builds, run each, write the report.

    Longer than 60 lines on purpose: the stages share the parsed arguments and the progress
    lines, and each refusal returns its exit code here, in the order ``--help`` describes.
    """
    from testbed.iotests.builds import block_formats, find_builds, stock_emulator, suite_tools
    from testbed.iotests.exclusions import excluded_for
    from testbed.iotests.modes import Mode, supervise_available
    from testbed.iotests.report import unexplained, write_report
    from testbed.iotests.results import TestRun, write_json
    from testbed.iotests.runner import DEFAULT_TIMEOUT, RunConfig, lay_out, run_all
    from testbed.iotests.selection import LeftOut, plan, scan_suite

    if args.from_json:
        return _from_json(args)
    try:
        modes = [Mode(m) for m in args.mode] if args.mode else list(Mode)
    except ValueError as err:
        print(f"testbed iotests: --mode: {err} (one of: {', '.join(Mode)})", file=sys.stderr)
        return 2
    try:
        builds = find_builds(dirs=args.qemu_build)
    except IotestsError as err:
        print(f"testbed iotests: {err}", file=sys.stderr)
        return 2
    if args.qemu_version:
        unknown = set(args.qemu_version) - {b.version for b in builds}
        if unknown:
            have = ", ".join(b.version for b in builds) or "none"
            print(
                f"testbed iotests: no build of QEMU {', '.join(sorted(unknown))} "
                f"(built: {have}; make qemu)",
                file=sys.stderr,
            )
            return 2
        builds = [b for b in builds if b.version in args.qemu_version]
    if not builds:
        print("testbed iotests: no QEMU build under build/qemu* (make qemu)", file=sys.stderr)
        return 2
    unavailable: dict[Mode, str] = {}
    if Mode.SUPERVISED in modes:
        why = supervise_available(args.supervisor)
        if why:
            unavailable[Mode.SUPERVISED] = why
            print(f"testbed iotests: {why}", file=sys.stderr)
    all_runs: list[TestRun] = []
    all_left: list[LeftOut] = []
    json_path = args.json or args.work / "iotests.json"
    meta: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
        "modes": ", ".join(m.value for m in modes),
        "formats": ", ".join(args.format),
    }
    progress = _Progress(json_path, meta)
    t0 = time.monotonic()
    for build in builds:
        try:
            tools = suite_tools(build)
            layout = lay_out(build, args.work)
            tests = scan_suite(layout.iotests)
            built = block_formats(build)
            runs, left = plan(
                tests,
                formats=[f for f in args.format if f in built],
                names=args.tests,
                excluded=excluded_for(build.version),
            )
        except IotestsError as err:
            print(f"testbed iotests: {err}", file=sys.stderr)
            return 2
        all_left += [LeftOut(f"{x.name} (QEMU {build.version})", x.reason) for x in left]
        meta[f"QEMU {build.version}"] = (
            f"{build.system_emulator} (source {build.source_version}); tools: {tools.origin}"
        )
        stock = stock_emulator(build)
        this_unavailable = dict(unavailable)  # per build: one may have a stock binary, one not
        if Mode.SUPERVISED in modes and stock is None:
            this_unavailable.setdefault(
                Mode.SUPERVISED,
                f"mode 'supervised' is not available for QEMU {build.version}: no stock "
                f"qemu-system of source {build.source_version}",
            )
        print(
            f"QEMU {build.version}: {len(runs)} test(s) x {len(modes)} mode(s) "
            f"({len(left)} left out); suite in {layout.iotests}",
            file=sys.stderr,
        )
        if args.list:
            for r in runs:
                print(f"{build.version} {r.test.name} {r.format} ({r.test.language})")
            for x in left:
                print(f"{build.version} {x.name} left out: {x.reason}")
            continue
        cfg = RunConfig(
            build=build,
            tools=tools,
            layout=layout,
            stock=stock,
            timeout=args.timeout or DEFAULT_TIMEOUT,
            retries=max(0, args.retries),
            unavailable=this_unavailable,
            testbed=args.broker,
            supervisor=args.supervisor,
        )
        all_runs += run_all(cfg, modes, runs, on_result=progress.add)
    if args.list:
        return 0
    meta["wall time"] = f"{time.monotonic() - t0:.0f} s"
    write_json(json_path, all_runs, meta)
    report = write_report(args.report or args.work / "report", all_runs, meta, all_left)
    print(f"results: {json_path}\nreport:  {report}", file=sys.stderr)
    bad = [f for m in modes if m is not Mode.UNHOOKED for f in unexplained(all_runs, m.value)]
    for f in bad:
        print(f"{f.mode}-only failure: {f.version} {f.test} ({f.format}): {f.reason}")
    return 1 if bad else 0


__all__ = ["register", "run"]
