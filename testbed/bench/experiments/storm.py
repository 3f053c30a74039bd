"""A start storm: N QEMUs (chain depth ``storm_depth``) spawned at once, until all greeted.

``hook``: one ``testbed broker --socket`` daemon serves every QEMU (a
connection each); ``path``: QEMU opens by path.  Each QEMU has its own
chain (they open their top read-write).  Per repetition, every size and
transport in turn; ``storm16_hook_vs_path`` pairs the 16-QEMU figures.
"""

from __future__ import annotations

import asyncio

from testbed.bench.chain import make_chain
from testbed.bench.experiments import Context, Experiment
from testbed.bench.experiments.qemus_alive import placed, usable
from testbed.bench.interleave import ainterleave
from testbed.bench.placement import Placement
from testbed.bench.qemurun import storm
from testbed.bench.results import Outcome, Row
from testbed.bench.stats import paired_ratios, spread

NAME = "storm"
ARMS = ("path", "hook")
KEY = "storm16_hook_vs_path"
KEYS = (KEY,)


async def measure(ctx: Context, out: Outcome) -> dict[str, list[float]]:
    skipped: list[Row] = []
    transports = [t for t, _ in usable(ctx, NAME, skipped, "storm") if t.name in ARMS]
    out.rows += [r for r in skipped if r.transport in ARMS]  # the others never storm
    version = ctx.plan.qemu_version
    top = max(ctx.plan.storm_sizes)
    chains = [
        make_chain(ctx.qemu_root / "storm" / f"vm{i}", ctx.plan.storm_depth) for i in range(top)
    ]
    ctx.services.broker()

    async def one(t_name: str, n: int) -> float:
        t = next(x for x in transports if x.name == t_name)
        launches = [t.launch(ctx.services, chains[i], version=version) for i in range(n)]
        return await storm(t.binary(version), launches)

    arms = {
        f"{t.name}@{n}": (lambda _rep, name=t.name, n=n: one(name, n))
        for n in ctx.plan.storm_sizes
        for t in transports
    }
    return await ainterleave(ctx.plan.reps, arms, log=ctx.log, label="storm")


def run(ctx: Context) -> Outcome:
    out = Outcome()
    with placed(ctx, Placement.UNPINNED) as where:
        runs = asyncio.run(measure(ctx, out))
    for key, secs in runs.items():
        name, _, n = key.partition("@")
        out.rows.append(Row(experiment=NAME, transport=name, setting=f"{n} QEMUs, {where}",
                            figures={"ms": spread([1000 * s for s in secs])},
                            qemu_version=ctx.plan.qemu_version))  # fmt: skip
    if "hook@16" in runs and "path@16" in runs:
        out.ratios[KEY] = paired_ratios(runs["hook@16"], runs["path@16"])
    else:
        out.missing[KEY] = "the 16-QEMU storm did not run for both hook and path"
    return out


PART = Experiment(name=NAME, run=run, keys=KEYS)
