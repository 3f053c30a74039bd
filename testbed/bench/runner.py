"""Run a benchmark plan: every transport, same machine, same file, one run.

The single-client comparison of the broker with the C limit is interleaved
(one repetition of each placement and transport in turn) so a burst of load
from elsewhere on the machine lands on both sides rather than on one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from testbed.bench import hostinfo
from testbed.bench.brokerload import BrokerProcess, ClientPool
from testbed.bench.climit import CMode, compile_c_limit, run_c
from testbed.bench.placement import Placement, cpus_for
from testbed.bench.qmpload import (
    PATCHED_QEMU,
    STOCK_QEMU,
    QmpRun,
    add_fd_runs,
    blockdev_runs,
)
from testbed.bench.results import Goal, Result, from_summary, goals, ratios, skipped
from testbed.bench.stats import RunFigures, summarise
from testbed.errors import TestbedError

Log = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class Plan:
    seconds: float  # per repetition of a timed transport
    reps: int
    warmup: int  # ops before timing, per client
    clients: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    sweep_placement: Placement = Placement.UNPINNED
    qmp_ops: int = 500
    qmp_reps: int = 5
    qmp_warmup: int = 20
    stock_qemu: str = STOCK_QEMU
    patched_qemu: str = PATCHED_QEMU
    work_dir: Path = Path("build/bench")

    def as_json(self) -> dict[str, object]:
        d = asdict(self)
        d["sweep_placement"] = self.sweep_placement.value
        d["work_dir"] = str(self.work_dir)
        return d


QUICK = Plan(seconds=0.25, reps=3, warmup=200, qmp_ops=150, qmp_reps=3)
FULL = Plan(seconds=1.0, reps=5, warmup=1000, qmp_ops=500, qmp_reps=5)


@dataclass(kw_only=True)
class Report:
    machine: dict[str, object]
    plan: Plan
    results: list[Result] = field(default_factory=list)
    ratios: dict[str, float | None] = field(default_factory=dict)
    goals: list[Goal] = field(default_factory=list)
    wall_s: float = 0.0

    def as_json(self) -> dict[str, object]:
        return {
            "machine": self.machine,
            "plan": self.plan.as_json(),
            "results": [r.as_json() for r in self.results],
            "ratios": self.ratios,
            "goals": [g.as_json() for g in self.goals],
            "wall_s": round(self.wall_s, 2),
        }


def make_file(directory: Path) -> Path:
    """The one file every transport opens: 64 KiB in a directory of its own."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "bench.img"
    if not path.exists() or path.stat().st_size != 65536:
        path.write_bytes(bytes(65536))
    return path.resolve()


def run(plan: Plan, log: Log) -> Report:
    started = time.monotonic()
    report = Report(machine=hostinfo.describe(), plan=plan)
    results = report.results
    file = make_file(plan.work_dir / "files")
    usable = os.sched_getaffinity(0)
    placements = [Placement.SAME_CORE, Placement.UNPINNED]
    if len(usable) >= 2:
        placements.insert(1, Placement.CROSS_CORE)
    else:
        for t in ("c_limit", "broker"):
            results.append(skipped(t, 1, "cross-core", f"only CPUs {sorted(usable)} usable"))

    log(f"compiling c_limit.c into {plan.work_dir}")
    binary = compile_c_limit(plan.work_dir)

    # 1. one client: the broker against the C limit, interleaved by placement
    c_runs: dict[Placement, list[RunFigures]] = {p: [] for p in placements}
    b_runs: dict[Placement, list[RunFigures]] = {p: [] for p in placements}
    pools: dict[Placement, ClientPool] = {}
    log("starting the broker and one client per placement")
    broker = BrokerProcess(file.parent, cpu=None)
    try:
        for p in placements:
            pools[p] = ClientPool(
                1, broker, file, cpu=cpus_for(p, usable).client, warmup=plan.warmup
            )
        for rep in range(plan.reps):
            for p in placements:
                cpus = cpus_for(p, usable)
                log(f"rep {rep + 1}/{plan.reps} {p.value}: c_limit, broker x1")
                c_runs[p].append(
                    run_c(binary, CMode.PINGPONG, file, seconds=plan.seconds,
                          warmup=plan.warmup, cpus=cpus)
                )  # fmt: skip
                broker.pin(cpus.broker)
                b_runs[p].append(pools[p].round(plan.seconds))
        for p in placements:
            results.append(from_summary("c_limit", 1, p.value, summarise(c_runs[p])))
            results.append(from_summary("broker", 1, p.value, summarise(b_runs[p])))
        for pool in pools.values():
            pool.close()
        pools.clear()

        # 2. the broker under load: N clients, sweep placement
        sweep = plan.sweep_placement
        cpus = cpus_for(sweep, usable)
        for n in plan.clients:
            if n == 1 and sweep in placements:
                continue  # measured above under this placement
            log(f"broker x{n} ({sweep.value}): {plan.reps} rounds of {plan.seconds:g}s")
            broker.pin(cpus.broker)
            with ClientPool(n, broker, file, cpu=cpus.client, warmup=plan.warmup) as pool:
                figures = [pool.round(plan.seconds) for _ in range(plan.reps)]
            results.append(from_summary("broker", n, sweep.value, summarise(figures)))
    finally:
        for pool in pools.values():
            pool.close()
        broker.stop()

    # 3. floors: open+close with no passing; pidfd_getfd pull
    same = cpus_for(Placement.SAME_CORE, usable)
    for mode, name in ((CMode.FLOOR, "c_floor"), (CMode.PIDFD, "c_pidfd")):
        log(f"{name}: {plan.reps} x {plan.seconds:g}s")
        runs = [
            run_c(binary, mode, file, seconds=plan.seconds, warmup=plan.warmup, cpus=same)
            for _ in range(plan.reps)
        ]
        results.append(from_summary(name, 1, "same-core", summarise(runs)))

    # 4 and 5. a real QEMU
    results.extend(qemu_results(plan, file, log))

    report.ratios = ratios(results, sweep_placement=plan.sweep_placement.value)
    report.goals = goals(results, report.ratios, sweep_placement=plan.sweep_placement.value)
    report.machine["load_average_at_end"] = hostinfo.load_average()
    report.wall_s = time.monotonic() - started
    return report


def qmp_result(name: str, runs: list[QmpRun]) -> Result:
    adds = [r.add_p50_us for r in runs if r.add_p50_us is not None]
    add_p50 = sorted(adds)[len(adds) // 2] if adds else None
    return from_summary(
        name, 1, "unpinned", summarise([r.figures for r in runs]), add_p50_us=add_p50
    )


def qemu_results(plan: Plan, file: Path, log: Log) -> list[Result]:
    out: list[Result] = []
    names = ("qmp_add_fd", "blockdev_add_path", "blockdev_add_fdset")
    kw = {"reps": plan.qmp_reps, "ops": plan.qmp_ops, "warmup": plan.qmp_warmup}
    if shutil.which(plan.stock_qemu) is None:
        reason = f"stock QEMU {plan.stock_qemu} not found"
        out += [skipped(n, 1, "unpinned", reason) for n in names]
    else:
        try:
            log(f"qmp add-fd + remove-fd: {plan.qmp_reps} x {plan.qmp_ops} ops")
            out.append(qmp_result(names[0], asyncio.run(add_fd_runs(plan.stock_qemu, file, **kw))))
            log(f"blockdev-add + blockdev-del by path: {plan.qmp_reps} x {plan.qmp_ops}")
            runs = blockdev_runs(plan.stock_qemu, file, via="path", **kw)
            out.append(qmp_result("blockdev_add_path", runs))
            log(f"blockdev-add + blockdev-del via fdset: {plan.qmp_reps} x {plan.qmp_ops}")
            runs = blockdev_runs(plan.stock_qemu, file, via="fdset", **kw)
            out.append(qmp_result("blockdev_add_fdset", runs))
        except TestbedError as err:
            done = {r.transport for r in out}
            out += [skipped(n, 1, "unpinned", f"failed: {err}") for n in names if n not in done]
    patched = Path(plan.patched_qemu)
    if not os.access(patched, os.X_OK):
        out.append(skipped("blockdev_add_hook", 1, "unpinned", f"patched QEMU {patched} not built"))
    else:
        try:
            log(f"blockdev-add + blockdev-del via the hook: {plan.qmp_reps} x {plan.qmp_ops}")
            runs = blockdev_runs(str(patched), file, via="hook", **kw)
            out.append(qmp_result("blockdev_add_hook", runs))
        except TestbedError as err:
            out.append(skipped("blockdev_add_hook", 1, "unpinned", f"failed: {err}"))
    return out
