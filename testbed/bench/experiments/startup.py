"""QEMU start to QMP greeting (``-S``) against the depth of the backing chain.

Per repetition, ``starts_per_cell`` rounds of one start of every (depth,
transport) in turn (the repetition's figure is each cell's median).  The
cost per extra layer is the least-squares slope of time against depth,
per transport, from each repetition's figures (median and spread of the
slopes).  ``startup_depth64_hook_vs_path`` pairs depth 64's hook and path
figures repetition by repetition.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Awaitable, Callable, Sequence

from testbed.bench.chain import make_chain
from testbed.bench.experiments import Context
from testbed.bench.experiments.qemus_alive import placed, usable
from testbed.bench.interleave import ainterleave_rounds
from testbed.bench.qemurun import started
from testbed.bench.results import Outcome, Row
from testbed.bench.stats import paired_ratios, spread
from testbed.bench.transports import Transport

NAME = "startup"
KEY = "startup_depth64_hook_vs_path"
KEYS = (KEY,)


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys against xs."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("a slope needs two or more points, as many xs as ys")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    if den == 0:
        raise ValueError("a slope needs two different xs")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


async def measure(ctx: Context, out: Outcome) -> dict[str, list[float]]:
    transports = usable(ctx, NAME, out.rows, "all depths")
    chains = {d: make_chain(ctx.qemu_root / "chains", d) for d in ctx.plan.depths}
    ctx.services.broker()  # the daemon is up before the first clock starts

    def start(t: Transport, depth: int) -> Callable[[], Awaitable[float]]:
        async def once() -> float:
            async with started(t.binary(ctx.env), t.launch(ctx.services, chains[depth])) as q:
                return q.greeting_s

        return once

    arms = {f"{t.name}@{d}": start(t, d) for d in ctx.plan.depths for t in transports}
    return await ainterleave_rounds(
        ctx.plan.reps, ctx.plan.starts_per_cell, arms, log=ctx.log, label="start-up"
    )


def run(ctx: Context) -> Outcome:
    out = Outcome()
    with placed(ctx, ctx.plan.qemu_placement) as where:
        runs = asyncio.run(measure(ctx, out))
    by_transport: dict[str, dict[int, list[float]]] = {}
    for key, secs in runs.items():
        name, _, depth = key.partition("@")
        by_transport.setdefault(name, {})[int(depth)] = secs
        out.rows.append(Row(experiment=NAME, transport=name, setting=f"depth {depth}, {where}",
                            figures={"ms": spread([1000 * s for s in secs])}))  # fmt: skip
    per_layer: dict[str, object] = {}
    depths = list(ctx.plan.depths)
    for name, cells in by_transport.items():
        slopes = [
            1000 * slope(depths, [cells[d][rep] for d in depths]) for rep in range(ctx.plan.reps)
        ]
        per_layer[name] = spread(slopes).as_json(3)
        out.rows.append(Row(experiment=NAME, transport=name, setting=f"ms per extra layer, {where}",
                            figures={"ms": spread(slopes)}))  # fmt: skip
    out.extra["startup_ms_per_layer"] = per_layer
    out.extra["startup_ms"] = {
        name: {str(d): spread([1000 * s for s in cells[d]]).as_json(2) for d in depths}
        for name, cells in by_transport.items()
    }
    if 64 in ctx.plan.depths and "hook" in by_transport and "path" in by_transport:
        out.ratios[KEY] = paired_ratios(by_transport["hook"][64], by_transport["path"][64])
    else:
        out.missing[KEY] = "depth 64, hook or path not measured"
    return out
