"""Run a plan: set up what every experiment shares, run the experiments, judge the goals.

Set-up: the 64 KiB ping-pong file, ``c_limit.c`` compiled, and the Python
floor's program derived from an strace of the broker serving one client
(:mod:`testbed.bench.syscalls`).  Then each experiment of
:data:`testbed.bench.experiments.EXPERIMENTS` in turn; a failing experiment
becomes skipped rows naming the error, and the others still run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from testbed.bench import hostinfo
from testbed.bench.climit import compile_c_limit
from testbed.bench.env import Env
from testbed.bench.experiments import EXPERIMENTS, Context, Experiment
from testbed.bench.goals import Verdict, judge
from testbed.bench.placement import Placement, cpus_for
from testbed.bench.plan import Plan
from testbed.bench.results import Outcome, Row
from testbed.bench.syscalls import Derived, per_request, trace_server
from testbed.bench.transports import Services
from testbed.errors import TestbedError

Log = Callable[[str], None]


@dataclass(kw_only=True)
class Report:
    machine: dict[str, object]
    plan: Plan
    outcome: Outcome = field(default_factory=Outcome)
    verdicts: list[Verdict] = field(default_factory=list)
    floor: dict[str, object] = field(default_factory=dict)
    wall_s: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "machine": self.machine,
            "plan": self.plan.to_json(),
            "placement": placement_note(self.plan),
            "python_floor": self.floor,
            "results": [r.to_json() for r in self.outcome.rows],
            "ratios": {v.key: v.to_json() for v in self.verdicts},
            "extra": self.outcome.extra,
            "wall_s": round(self.wall_s, 2),
        }


def placement_note(plan: Plan) -> dict[str, object]:
    """Which CPUs each placement means on this machine (recorded in the JSON)."""
    out: dict[str, object] = {}
    for p in Placement:
        try:
            c = cpus_for(p)
        except ValueError as err:
            out[p.value] = str(err)
            continue
        out[p.value] = {"server": c.broker, "client": c.client}
    out["qemu"] = (
        f"blockdev, startup, snapshot: {plan.qemu_placement.value} (the harness, every QEMU, "
        "C server and the broker daemon); storm and handover: unpinned"
    )
    out["sweep"] = "throughput unpinned; the 64-client tail same-core (and unpinned, information)"
    return out


def make_file(directory: Path) -> Path:
    """The one file every ping-pong opens: 64 KiB in a directory of its own."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "bench.img"
    if not path.exists() or path.stat().st_size != 65536:
        path.write_bytes(bytes(65536))
    return path.resolve()


def broker_trace_argv(grant: Path) -> list[str]:
    """The broker as the floor's program is derived from: ``--fd``, the same grant.

    ``--poll-us 0``: polling is what an idle broker does between requests, not
    part of serving one, and it is off where the floor is compared (pinned to
    one core, as ``broker_cpu_vs_python_floor`` is taken).
    """
    return [
        sys.executable, "-m", "testbed", "broker", "--fd", "{fd}", "--allow-ro", str(grant),
        "--poll-us", "0",
    ]  # fmt: skip


def derive_floor(file: Path) -> Derived:
    """The broker's per-request system calls, from strace (SyscallTraceError if not)."""
    return per_request(trace_server(broker_trace_argv(file.parent), file=file))


def make_env(plan: Plan, work_dir: Path, log: Log) -> tuple[Env, dict[str, object]]:
    file = make_file(work_dir / "files")
    c_limit, c_error = None, ""
    try:
        log(f"compiling c_limit.c into {work_dir}")
        c_limit = compile_c_limit(work_dir)
    except TestbedError as err:
        c_error = str(err)
    floor: dict[str, object] = {}
    program, floor_error = None, ""
    try:
        log("deriving the Python floor's system calls from an strace of the broker")
        derived = derive_floor(file)
        program = derived.program
        floor = {
            "derived_from": " ".join(broker_trace_argv(file.parent)),
            "syscalls": [s.label() for s in program],
            "requests_traced": derived.segments,
            "requests_matching": derived.matching,
        }
    except (TestbedError, OSError) as err:
        floor_error = str(err)
        floor = {"error": floor_error}
    env = Env(
        work_dir=work_dir, file=file, warmup=plan.warmup, qemu_version=plan.qemu_version,
        c_limit=c_limit, c_limit_error=c_error, floor_program=program, floor_error=floor_error,
    )  # fmt: skip
    return env, floor


def run_one(experiment: Experiment, ctx: Context) -> Outcome:
    """One experiment's outcome; a failure becomes a skipped row naming the error."""
    name = experiment.name
    t0 = time.monotonic()
    try:
        outcome = experiment.run(ctx)
    except (TestbedError, OSError) as err:
        ctx.log(f"{name}: FAILED: {err}")
        outcome = Outcome(rows=[Row(experiment=name, transport="-", setting="-",
                                    skipped=f"failed: {err}".splitlines()[0])])  # fmt: skip
        for key in experiment.keys:
            outcome.missing[key] = f"{name} failed: {err}"
    ctx.log(f"{name}: {time.monotonic() - t0:.1f}s")
    return outcome


def run(plan: Plan, work_dir: Path, log: Log) -> Report:
    started = time.monotonic()
    report = Report(machine=hostinfo.describe(), plan=plan)
    env, report.floor = make_env(plan, work_dir, log)
    qemu_root = (work_dir / "qemu").resolve()
    qemu_root.mkdir(parents=True, exist_ok=True)
    services = Services(env, qemu_root)
    ctx = Context(plan=plan, env=env, services=services, qemu_root=qemu_root, log=log)
    try:
        for experiment in EXPERIMENTS.select(list(plan.experiments) if plan.experiments else None):
            report.outcome.merge(run_one(experiment, ctx))
    finally:
        services.close()
    report.verdicts = judge(report.outcome.ratios, report.outcome.missing)
    report.machine["load_average_at_end"] = hostinfo.load_average()
    report.wall_s = time.monotonic() - started
    return report
