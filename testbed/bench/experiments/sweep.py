"""The broker under N clients, every N interleaved repetition by repetition.

A pool of N client processes per N is started once against one broker,
placed as the plan's ``sweep_placement`` says (default cross-core: the
broker alone on the first CPU, every client on the second, so that what is
measured is the broker under load, not how the scheduler shares one core
between it and 64 load generators);
each repetition runs one round of every pool in turn.  Per repetition:
``broker_64_vs_broker_1`` = ops/s with 64 clients over ops/s with 1, and
``broker_64_p99_vs_littles_mean`` = p99 at 64 clients over Little's mean
latency 64 / throughput of the same round (so it says how far the tail
sits from what a closed loop of 64 must see, whatever the machine's speed).
"""

from __future__ import annotations

import contextlib

from testbed.bench.brokerload import BrokerProcess, ClientPool
from testbed.bench.experiments import Context, Experiment
from testbed.bench.interleave import interleave
from testbed.bench.placement import cpus_for
from testbed.bench.results import Outcome, Row, figures_of

NAME = "sweep"
KEYS = ("broker_64_vs_broker_1", "broker_64_p99_vs_littles_mean")


def run(ctx: Context) -> Outcome:
    out = Outcome()
    counts = sorted(set(ctx.plan.clients) | {1, 64})
    placement = ctx.plan.sweep_placement
    cpus = cpus_for(placement)
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(BrokerProcess(ctx.env.file.parent, cpu=cpus.broker))
        pools = {}
        for n in counts:
            ctx.log(f"sweep: {n} client(s), {placement.value}")
            pools[n] = stack.enter_context(
                ClientPool(
                    n, broker, ctx.env.file, cpu=cpus.client, warmup=ctx.plan.warmup // 4 or 1
                )
            )
        arms = {str(n): (lambda _rep, p=pools[n]: p.round(ctx.plan.seconds)) for n in counts}
        runs = interleave(ctx.plan.reps, arms, log=ctx.log, label="sweep")
    for n in counts:
        setting = f"{n} clients {placement.value}"
        out.rows.append(Row(experiment=NAME, transport="broker", setting=setting,
                            figures=figures_of(runs[str(n)])))  # fmt: skip
    one, top = runs["1"], runs["64"]
    out.ratios["broker_64_vs_broker_1"] = [
        a.ops_per_s / b.ops_per_s for a, b in zip(top, one, strict=True)
    ]
    out.ratios["broker_64_p99_vs_littles_mean"] = [r.p99_us / (64 / r.ops_per_s * 1e6) for r in top]
    out.extra["sweep_placement"] = placement.value
    return out


PART = Experiment(name=NAME, run=run, keys=KEYS)
