"""QEMU start to QMP greeting (``-S``) against the depth of the backing chain.

Per repetition, ``starts_per_cell`` rounds of one start of every (depth,
transport) in turn (the repetition's figure is each cell's median).  The
cost per extra layer is the least-squares slope of time against depth,
per transport, from each repetition's figures (median and spread of the
slopes).  ``startup_depth64_hook_vs_path`` pairs depth 64's hook and path
figures repetition by repetition; ``startup_supervised_vs_plain`` and
``startup_landlock_vs_plain`` pair depth 1's ``seccomp`` and
``seccomp_landlock`` with ``path_debian`` (the same stock binary, plain).
Runs on the plan's first QEMU version.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Awaitable, Callable, Sequence

from testbed.bench.chain import make_chain
from testbed.bench.experiments import Context, Experiment
from testbed.bench.experiments.qemus_alive import placed, usable
from testbed.bench.interleave import ainterleave_rounds
from testbed.bench.qemurun import started
from testbed.bench.results import Outcome, Row
from testbed.bench.stats import paired_ratios, spread
from testbed.bench.transports import Transport
from testbed.errors import BenchUsageError

NAME = "startup"
KEY = "startup_depth64_hook_vs_path"
#: ratio key -> (numerator, denominator) transports at depth 1
SUPERVISED = {
    "startup_supervised_vs_plain": ("seccomp", "path_debian"),
    "startup_landlock_vs_plain": ("seccomp_landlock", "path_debian"),
}
KEYS = (KEY, *SUPERVISED)


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys against xs."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise BenchUsageError("a slope needs two or more points, as many xs as ys")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    if den == 0:
        raise BenchUsageError("a slope needs two different xs")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


async def measure(ctx: Context, out: Outcome) -> dict[str, list[float]]:
    arms_here = usable(ctx, NAME, out.rows, "all depths")
    chains = {d: make_chain(ctx.qemu_root / "chains", d) for d in ctx.plan.depths}
    ctx.services.broker()  # the daemon is up before the first clock starts

    def start(t: Transport, version: str, depth: int) -> Callable[[], Awaitable[float]]:
        async def once() -> float:
            launch = t.launch(ctx.services, chains[depth], version=version)
            async with started(t.binary(version), launch) as q:
                return q.greeting_s

        return once

    arms = {f"{t.name}@{d}": start(t, v, d) for d in ctx.plan.depths for t, v in arms_here}
    return await ainterleave_rounds(
        ctx.plan.reps, ctx.plan.starts_per_cell, arms, log=ctx.log, label="start-up"
    )


def run(ctx: Context) -> Outcome:
    out = Outcome()
    with placed(ctx, ctx.plan.qemu_placement) as where:
        runs = asyncio.run(measure(ctx, out))
    version = ctx.plan.qemu_version
    by_transport: dict[str, dict[int, list[float]]] = {}
    for key, secs in runs.items():
        name, _, depth = key.partition("@")
        by_transport.setdefault(name, {})[int(depth)] = secs
        out.rows.append(Row(experiment=NAME, transport=name, setting=f"depth {depth}, {where}",
                            figures={"ms": spread([1000 * s for s in secs])},
                            qemu_version=version))  # fmt: skip
    per_layer: dict[str, object] = {}
    depths = list(ctx.plan.depths)
    for name, cells in by_transport.items():
        slopes = [
            1000 * slope(depths, [cells[d][rep] for d in depths]) for rep in range(ctx.plan.reps)
        ]
        per_layer[name] = spread(slopes).to_json(3)
        out.rows.append(Row(experiment=NAME, transport=name, setting=f"ms per extra layer, {where}",
                            figures={"ms": spread(slopes)}, qemu_version=version))  # fmt: skip
    out.extra["startup_ms_per_layer"] = per_layer
    out.extra["startup_ms"] = {
        name: {str(d): spread([1000 * s for s in cells[d]]).to_json(2) for d in depths}
        for name, cells in by_transport.items()
    }
    if 64 in ctx.plan.depths and "hook" in by_transport and "path" in by_transport:
        out.ratios[KEY] = paired_ratios(by_transport["hook"][64], by_transport["path"][64])
    else:
        out.missing[KEY] = "depth 64, hook or path not measured"
    for key, (num, den) in SUPERVISED.items():
        cells_num, cells_den = by_transport.get(num, {}), by_transport.get(den, {})
        if 1 in cells_num and 1 in cells_den:
            out.ratios[key] = paired_ratios(cells_num[1], cells_den[1])
        else:
            out.missing[key] = f"depth 1, {num} or {den} not measured"
    return out


PART = Experiment(name=NAME, run=run, keys=KEYS)
