"""``testbed compare``: run the scenario matrix through every oracle and report."""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.qemu.binaries import REPO_ROOT

if TYPE_CHECKING:
    from testbed.compare.run import ScenarioResult
    from testbed.compare.runners.images import ImageInfo
    from testbed.compare.runners.setup import Binaries
    from testbed.compare.scenarios import Scenario

_DEFAULT_INDEX = REPO_ROOT / "build" / "images" / "index.json"
_DEFAULT_WORK = REPO_ROOT / "build" / "compare"


def register(sub: Any) -> None:
    """The ``compare`` sub-command and its options, in the order ``--help`` shows them."""
    p = sub.add_parser(
        "compare",
        help="model vs patched QEMU vs stock QEMU vs fd sets, scenario by scenario",
        description=(
            "Run each scenario through the Python model and the patched QEMU (both "
            "through a broker), stock QEMU under strace and upstream's fd sets; compare "
            "the normalised opens and write a report.  Exit status 1 on any unexpected "
            "mismatch."
        ),
    )
    _scenario_options(p)
    _output_options(p)
    _run_options(p)
    p.set_defaults(func=main)


def _scenario_options(p: argparse.ArgumentParser) -> None:
    """Which scenarios: globs, scenario files, and the listing and dumping of them."""
    p.add_argument(
        "--scenario",
        action="append",
        default=[],
        metavar="GLOB",
        help="only scenarios whose name matches (repeatable)",
    )
    p.add_argument(
        "--scenario-file",
        action="append",
        default=[],
        type=Path,
        metavar="FILE.toml",
        help="also run the scenarios in FILE (repeatable; format in docs/compare.md)",
    )
    p.add_argument(
        "--only-files",
        action="store_true",
        help="run only the --scenario-file scenarios, not the built-in matrix",
    )
    p.add_argument(
        "--dump-scenarios",
        type=Path,
        metavar="DIR",
        help="write the built-in matrix as scenario files (one per operation) into DIR and exit",
    )
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")


def _output_options(p: argparse.ArgumentParser) -> None:
    """Where the results go."""
    p.add_argument("--json", type=Path, metavar="FILE", help="write every trace as JSON")
    p.add_argument(
        "--report", type=Path, metavar="DIR", help="write report.md and report.html into DIR"
    )


def _run_options(p: argparse.ArgumentParser) -> None:
    """What runs them: images, work directory, parallelism, QEMU versions, oracles."""
    p.add_argument(
        "--images",
        type=Path,
        default=_DEFAULT_INDEX,
        metavar="INDEX",
        help="the image index (default: build/images/index.json)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=_DEFAULT_WORK,
        metavar="DIR",
        help="where scenario copies, logs and traces go (default: build/compare)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="scenarios run at once (default 1; the machine has 2 cores)",
    )
    p.add_argument(
        "--qemu-version",
        default="",
        metavar="V[,V...]",
        help=(
            "run the matrix once per QEMU version, each with its own patched and stock "
            "binaries (default: every version `make qemu` has built, e.g. 7.2,10.0)"
        ),
    )
    p.add_argument(
        "--oracles",
        default="",
        metavar="NAME[,NAME...]",
        help=(
            "comma-separated subset of the oracles (default: all of them, in the order "
            "testbed.compare.oracles registers them; docs/compare.md lists them)"
        ),
    )


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """What a run does: which scenarios, by which oracles, on which QEMU builds, which images."""

    scenarios: list[Scenario]
    oracles: tuple[str, ...]
    versions: list[str]
    images: dict[str, ImageInfo]
    #: chosen once per version, and handed to every runner of that version
    binaries: dict[str, Binaries]


def main(args: argparse.Namespace) -> int:
    """``testbed compare``: choose the scenarios and oracles, run them, write the reports."""
    from rich.console import Console

    from testbed.compare.compare import Status
    from testbed.errors import TestbedError

    console = Console(stderr=False)
    err = Console(stderr=True, soft_wrap=True)
    if args.dump_scenarios:
        return _dump(console, args.dump_scenarios)
    try:
        chosen = _choose(args)
    except (ValueError, TestbedError) as e:
        err.print(f"testbed compare: {e}", highlight=False, markup=False)
        return 2
    if args.list:
        return _list(console, chosen)
    plan = _plan(args, chosen)
    if isinstance(plan, str):
        err.print(f"testbed compare: {plan}", highlight=False, markup=False)
        return 2
    meta = _meta(plan)
    started = time.monotonic()
    ordered = _run(args, plan, err)
    meta["wall_seconds"] = round(time.monotonic() - started, 1)
    _write(console, args, ordered, meta)
    return 1 if any(r.status == Status.MISMATCH for r in ordered) else 0


def _dump(console: Any, directory: Path) -> int:
    from testbed.compare import scenario_file
    from testbed.compare.scenarios import build_matrix

    for path in scenario_file.dump_matrix(build_matrix(), directory):
        console.print(str(path), highlight=False)
    return 0


def _choose(args: argparse.Namespace) -> list[Scenario]:
    """The built-in matrix (unless --only-files) and the files' scenarios, matching --scenario."""
    from testbed.compare import scenario_file
    from testbed.compare.scenarios import build_matrix, check_unique, select

    every = [] if args.only_files else build_matrix()
    for path in args.scenario_file:
        every += scenario_file.load(path)
    check_unique(every)
    return select(every, args.scenario)


def _list(console: Any, chosen: list[Scenario]) -> int:
    for sc in chosen:
        console.print(
            f"{sc.name}  [dim]{sc.operation}: {sc.image or sc.main} {sc.attach} "
            f"grant={sc.grant} {'; '.join(sc.operations)}[/]",
            highlight=False,
            markup=True,
        )
    console.print(f"{len(chosen)} scenarios")
    return 0


def _plan(args: argparse.Namespace, chosen: list[Scenario]) -> _Plan | str:
    """The run's oracles, QEMU versions and images; what is wrong with them, if anything."""
    from testbed.compare.oracles import ORACLES
    from testbed.compare.runners.images import load_index
    from testbed.compare.runners.setup import Binaries
    from testbed.errors import TestbedError
    from testbed.qemu import built_versions
    from testbed.qemu.versions import parse_versions

    oracles = tuple(o.strip() for o in args.oracles.split(",") if o.strip()) or tuple(ORACLES)
    unknown = [o for o in oracles if o not in ORACLES]
    if unknown:
        return f"unknown oracle(s) {', '.join(unknown)} (known: {', '.join(ORACLES)})"
    if args.jobs < 1:
        return f"--jobs must be at least 1, not {args.jobs}"
    try:
        if args.qemu_version:
            versions = [v.name for v in parse_versions(args.qemu_version)]
        else:
            versions = list(built_versions()) or [v.name for v in parse_versions("")]
        images = load_index(args.images)
    except TestbedError as e:
        return str(e)
    missing = sorted({sc.image for sc in chosen if sc.image and sc.image not in images})
    if missing:
        return f"images not in {args.images}: {', '.join(missing)} (run `make images`)"
    binaries = {v: Binaries.of(v) for v in versions}
    return _Plan(
        scenarios=chosen, oracles=oracles, versions=versions, images=images, binaries=binaries
    )


def _meta(plan: _Plan) -> dict[str, Any]:
    from testbed.qemu import Kind

    return {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "qemu_versions": plan.versions,
        "binaries": {
            v: {Kind.PATCHED: str(b.patched), Kind.STOCK: str(b.stock)}
            for v, b in plan.binaries.items()
        },
        "oracles": list(plan.oracles),
        "argv": sys.argv,
    }


def _run(args: argparse.Namespace, plan: _Plan, err: Any) -> list[ScenarioResult]:
    """Every scenario on every version, ``--jobs`` at once, with a progress bar on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from testbed.compare.run import run_scenario

    results: dict[tuple[str, str], ScenarioResult] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    runs = [(v, sc) for v in plan.versions for sc in plan.scenarios]
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("comparing", total=len(runs))

        def one(version: str, sc: Scenario) -> None:
            # one work directory per version: a scenario's copies and logs stay apart
            res = run_scenario(
                sc,
                plan.images.get(sc.image),
                args.workdir / version,
                plan.oracles,
                binaries=plan.binaries[version],
            )
            results[version, sc.name] = res
            progress.update(task, advance=1, description=f"{version} {sc.name}: {res.status}")

        with ThreadPoolExecutor(args.jobs) as pool:
            for f in [pool.submit(one, v, sc) for v, sc in runs]:
                f.result()
    return [results[v, sc.name] for v, sc in runs]


def _write(
    console: Any, args: argparse.Namespace, ordered: list[ScenarioResult], meta: dict[str, Any]
) -> None:
    from testbed.compare import report

    report.print_summary(console, ordered, meta["wall_seconds"])
    if args.json:
        report.write_json(args.json, ordered, meta)
        console.print(f"JSON: {args.json}")
    if args.report:
        report.write_markdown(args.report / "report.md", ordered, meta)
        report.write_html(args.report / "report.html", ordered, meta)
        console.print(f"report: {args.report / 'report.html'} (and report.md)")
