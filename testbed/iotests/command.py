"""``testbed iotests``: QEMU's own tests/qemu-iotests with every qemu-system open hooked."""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.errors import IotestsError

if TYPE_CHECKING:
    # Only for annotations: the CLI imports every command module, and
    # `testbed broker` should start fast, so the parts load when run.
    from testbed.iotests.builds import QemuBuild, SuiteTools
    from testbed.iotests.modes import Mode
    from testbed.iotests.results import TestRun
    from testbed.iotests.runner import Layout, RunConfig
    from testbed.iotests.selection import LeftOut, Planned

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


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need a whole number of at least 1")
    return n


def register(sub: Any) -> None:
    """The ``iotests`` sub-command and its options.

    Long because it is one flat list of options, in the order ``--help``
    shows them: split up, the options would only be scattered over functions.
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
        "--jobs",
        "-j",
        type=_positive,
        default=1,
        metavar="N",
        help="run N tests at once, each in its own process group and directories "
        "(default 1; `make iotests` runs one per CPU). Tests that race with QEMU's exit "
        "or a job lose more often when another test shares the CPUs; --retries applies",
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
        "merged (e.g. one per version, or a run cut short); a later file's result for "
        "the same version, mode, format and test replaces an earlier one's",
    )
    p.add_argument(
        "tests", nargs="*", metavar="TEST", help="iotests by name (default: the selection)"
    )
    p.set_defaults(func=run)


def _from_json(args: argparse.Namespace) -> int:
    from testbed.iotests.modes import Mode
    from testbed.iotests.report import unexplained, write_report
    from testbed.iotests.results import read_json, write_json

    # a later file's result for the same run replaces an earlier one's (a test
    # run again after a fix), in the earlier one's place
    merged: dict[tuple[str, str, str, str], TestRun] = {}
    meta: dict[str, Any] = {}
    for path in args.from_json:
        try:
            more, m = read_json(path)
        except IotestsError as err:
            print(f"testbed iotests: {err}", file=sys.stderr)
            return 2
        for r in more:
            merged[(r.version, r.mode, r.format, r.test)] = r
        meta.update({f"{k} ({path.name})" if k in meta else k: v for k, v in m.items()})
    runs = list(merged.values())
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


def _modes(args: argparse.Namespace) -> list[Mode]:
    from testbed.iotests.modes import Mode

    try:
        return [Mode(m) for m in args.mode] if args.mode else list(Mode)
    except ValueError as err:
        raise IotestsError(f"--mode: {err} (one of: {', '.join(Mode)})") from err


def _builds(args: argparse.Namespace) -> list[QemuBuild]:
    """The builds to run: every one found, or those of ``--qemu-version``; at least one."""
    from testbed.iotests.builds import find_builds

    builds = find_builds(dirs=args.qemu_build)
    if args.qemu_version:
        unknown = set(args.qemu_version) - {b.version for b in builds}
        if unknown:
            have = ", ".join(b.version for b in builds) or "none"
            raise IotestsError(
                f"no build of QEMU {', '.join(sorted(unknown))} (built: {have}; make qemu)"
            )
        builds = [b for b in builds if b.version in args.qemu_version]
    if not builds:
        raise IotestsError("no QEMU build under build/qemu* (make qemu)")
    return builds


def _unavailable(args: argparse.Namespace, modes: Sequence[Mode]) -> dict[Mode, str]:
    """Modes that cannot run with any build, and why (printed once)."""
    from testbed.iotests.modes import Mode, supervise_available

    unavailable: dict[Mode, str] = {}
    if Mode.SUPERVISED in modes:
        why = supervise_available(args.supervisor)
        if why:
            unavailable[Mode.SUPERVISED] = why
            print(f"testbed iotests: {why}", file=sys.stderr)
    return unavailable


@dataclass(frozen=True)
class _BuildPlan:
    """One build's suite: its tools and layout, the tests to run and those left out."""

    tools: SuiteTools
    layout: Layout
    runs: list[Planned]
    left: list[LeftOut]


def _plan_build(args: argparse.Namespace, build: QemuBuild) -> _BuildPlan:
    from testbed.iotests.builds import block_formats, suite_tools
    from testbed.iotests.exclusions import excluded_for
    from testbed.iotests.runner import lay_out
    from testbed.iotests.selection import plan, scan_suite

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
    return _BuildPlan(tools=tools, layout=layout, runs=runs, left=left)


def _unavailable_for(
    build: QemuBuild, stock: Path | None, modes: Sequence[Mode], unavailable: dict[Mode, str]
) -> dict[Mode, str]:
    """``unavailable`` plus what this build lacks: one may have a stock binary, one not."""
    from testbed.iotests.modes import Mode

    this_unavailable = dict(unavailable)
    if Mode.SUPERVISED in modes and stock is None:
        this_unavailable.setdefault(
            Mode.SUPERVISED,
            f"mode 'supervised' is not available for QEMU {build.version}: no stock "
            f"qemu-system of source {build.source_version}",
        )
    return this_unavailable


def _run_config(
    args: argparse.Namespace,
    build: QemuBuild,
    planned: _BuildPlan,
    stock: Path | None,
    unavailable: dict[Mode, str],
) -> RunConfig:
    from testbed.iotests.runner import DEFAULT_TIMEOUT, RunConfig

    return RunConfig(
        build=build,
        tools=planned.tools,
        layout=planned.layout,
        stock=stock,
        timeout=args.timeout or DEFAULT_TIMEOUT,
        retries=max(0, args.retries),
        unavailable=unavailable,
        testbed=args.broker,
        supervisor=args.supervisor,
    )


def _print_plan(build: QemuBuild, planned: _BuildPlan) -> None:
    for r in planned.runs:
        print(f"{build.version} {r.test.name} {r.format} ({r.test.language})")
    for x in planned.left:
        print(f"{build.version} {x.name} left out: {x.reason}")


def _finish(
    args: argparse.Namespace,
    modes: Sequence[Mode],
    json_path: Path,
    runs: list[TestRun],
    meta: dict[str, Any],
    left: list[LeftOut],
) -> int:
    """Write the JSON and the report, print the failures only a hooked mode has; exit status."""
    from testbed.iotests.modes import Mode
    from testbed.iotests.report import unexplained, write_report
    from testbed.iotests.results import write_json

    write_json(json_path, runs, meta)
    report = write_report(args.report or args.work / "report", runs, meta, left)
    print(f"results: {json_path}\nreport:  {report}", file=sys.stderr)
    bad = [f for m in modes if m is not Mode.UNHOOKED for f in unexplained(runs, m.value)]
    for f in bad:
        print(f"{f.mode}-only failure: {f.version} {f.test} ({f.format}): {f.reason}")
    return 1 if bad else 0


def run(args: argparse.Namespace) -> int:
    """``testbed iotests``: check the arguments, pick the builds, run each, write the report.

    Exit status 2 when the arguments or a build's suite cannot be used.
    """
    from testbed.iotests.builds import stock_emulator
    from testbed.iotests.modes import Mode
    from testbed.iotests.runner import run_all
    from testbed.iotests.selection import LeftOut

    if args.from_json:
        return _from_json(args)
    try:
        modes = _modes(args)
        builds = _builds(args)
    except IotestsError as err:
        print(f"testbed iotests: {err}", file=sys.stderr)
        return 2
    unavailable = _unavailable(args, modes)
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
            planned = _plan_build(args, build)
        except IotestsError as err:
            print(f"testbed iotests: {err}", file=sys.stderr)
            return 2
        all_left += [LeftOut(f"{x.name} (QEMU {build.version})", x.reason) for x in planned.left]
        meta[f"QEMU {build.version}"] = (
            f"{build.system_emulator} (source {build.source_version}); "
            f"tools: {planned.tools.origin}"
        )
        stock = stock_emulator(build)
        if Mode.SUPERVISED in modes and stock is not None:
            meta[f"QEMU {build.version} supervised"] = str(stock)
        print(
            f"QEMU {build.version}: {len(planned.runs)} test(s) x {len(modes)} mode(s) "
            f"({len(planned.left)} left out); suite in {planned.layout.iotests}",
            file=sys.stderr,
        )
        if args.list:
            _print_plan(build, planned)
            continue
        cfg = _run_config(
            args, build, planned, stock, _unavailable_for(build, stock, modes, unavailable)
        )
        all_runs += run_all(cfg, modes, planned.runs, on_result=progress.add, jobs=args.jobs)
    if args.list:
        return 0
    meta["wall time"] = f"{time.monotonic() - t0:.0f} s"
    return _finish(args, modes, json_path, all_runs, meta, all_left)


__all__ = ["register", "run"]
