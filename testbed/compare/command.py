"""``testbed compare``: run the scenario matrix through every oracle and report."""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from testbed.qemu.binaries import REPO_ROOT

_DEFAULT_INDEX = REPO_ROOT / "build" / "images" / "index.json"
_DEFAULT_WORK = REPO_ROOT / "build" / "compare"


def register(sub: Any) -> None:
    """The ``compare`` sub-command and its options.

    Longer than 60 lines on purpose: one flat list of options, in the order ``--help`` shows
    them.
    """
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
    p.add_argument("--json", type=Path, metavar="FILE", help="write every trace as JSON")
    p.add_argument(
        "--report", type=Path, metavar="DIR", help="write report.md and report.html into DIR"
    )
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
        default="model,patched,stock,fdset,seccomp",
        help="comma-separated subset of the oracles (default: all of them)",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """``testbed compare``: choose the scenarios and oracles, run them, write the reports.

    Longer than 60 lines on purpose: the stages share the parsed arguments, and each refusal
    returns its exit code here, in the order they are checked.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from testbed.compare import report, scenario_file
    from testbed.compare.run import ORACLES, ScenarioResult, run_scenario
    from testbed.compare.runners.common import Binaries, load_index
    from testbed.compare.scenarios import build_matrix, check_unique, select
    from testbed.errors import TestbedError
    from testbed.qemu import built_versions
    from testbed.qemu.versions import parse_versions

    console = Console(stderr=False)
    err = Console(stderr=True, soft_wrap=True)
    if args.dump_scenarios:
        for path in scenario_file.dump_matrix(build_matrix(), args.dump_scenarios):
            console.print(str(path), highlight=False)
        return 0
    try:
        every = [] if args.only_files else build_matrix()
        for path in args.scenario_file:
            every += scenario_file.load(path)
        check_unique(every)
        chosen = select(every, args.scenario)
    except (ValueError, TestbedError) as e:
        err.print(f"testbed compare: {e}", highlight=False, markup=False)
        return 2
    if args.list:
        for sc in chosen:
            console.print(
                f"{sc.name}  [dim]{sc.operation}: {sc.image or sc.main} {sc.attach} "
                f"grant={sc.grant} {'; '.join(sc.operations)}[/]",
                highlight=False,
                markup=True,
            )
        console.print(f"{len(chosen)} scenarios")
        return 0
    oracles = tuple(o.strip() for o in args.oracles.split(",") if o.strip())
    unknown = [o for o in oracles if o not in ORACLES]
    if unknown:
        err.print(f"testbed compare: unknown oracle(s) {', '.join(unknown)}")
        return 2
    if args.jobs < 1:
        err.print(f"testbed compare: --jobs must be at least 1, not {args.jobs}")
        return 2
    try:
        if args.qemu_version:
            versions = [v.name for v in parse_versions(args.qemu_version)]
        else:
            versions = list(built_versions()) or [v.name for v in parse_versions("")]
    except TestbedError as e:
        err.print(f"testbed compare: {e}")
        return 2
    try:
        images = load_index(args.images)
    except TestbedError as e:
        err.print(f"testbed compare: {e}")
        return 2
    missing = sorted({sc.image for sc in chosen if sc.image and sc.image not in images})
    if missing:
        err.print(
            f"testbed compare: images not in {args.images}: {', '.join(missing)} "
            "(run `make images`)"
        )
        return 2
    # chosen here, once per version, and handed to every runner of that version
    binaries = {v: Binaries.of(v) for v in versions}
    meta: dict[str, Any] = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "qemu_versions": versions,
        "binaries": {
            v: {"patched": str(b.patched), "stock": str(b.stock)} for v, b in binaries.items()
        },
        "oracles": list(oracles),
        "argv": sys.argv,
    }
    results: dict[tuple[str, str], ScenarioResult] = {}
    started = time.monotonic()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    runs = [(v, sc) for v in versions for sc in chosen]
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("comparing", total=len(runs))

        def one(version: str, sc: Any) -> None:
            # one work directory per version: a scenario's copies and logs stay apart
            res = run_scenario(
                sc,
                images.get(sc.image),
                args.workdir / version,
                oracles,
                binaries=binaries[version],
            )
            results[version, sc.name] = res
            progress.update(task, advance=1, description=f"{version} {sc.name}: {res.status}")

        with ThreadPoolExecutor(args.jobs) as pool:
            for f in [pool.submit(one, v, sc) for v, sc in runs]:
                f.result()
    ordered = [results[v, sc.name] for v, sc in runs]
    meta["wall_seconds"] = round(time.monotonic() - started, 1)
    report.print_summary(console, ordered, meta["wall_seconds"])
    if args.json:
        report.write_json(args.json, ordered, meta)
        console.print(f"JSON: {args.json}")
    if args.report:
        report.write_markdown(args.report / "report.md", ordered, meta)
        report.write_html(args.report / "report.html", ordered, meta)
        console.print(f"report: {args.report / 'report.html'} (and report.md)")
    return 1 if any(r.status == "mismatch" for r in ordered) else 0
