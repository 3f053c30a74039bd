"""The broker under N clients, every pool interleaved repetition by repetition.

Pools of N client processes are started once against a broker and each
repetition runs one round of every pool in turn:

* **unpinned**, N = 1, 2, 4 ... 64: broker and clients wherever the
  scheduler puts them, both CPUs in use.  ``broker_64_vs_broker_1`` = ops/s
  with 64 clients over ops/s with 1: whether throughput holds up as clients
  are added.
* **same-core**, N = 1 and 64: a second broker and its clients all on the
  first CPU.  ``broker_64_p99_vs_littles_mean`` = p99 at 64 clients over
  Little's mean latency 64 / throughput of the same round: how far the tail
  sits from what a closed loop of 64 must see, i.e. whether the broker
  serves its peers fairly.  It is taken on one core because on these
  virtual machines every wake-up of an idle vCPU costs 0.1-0.9 ms and
  varies tenfold between rounds: unpinned, the tail measures those wake-ups
  (the figure is kept as ``broker_64_p99_vs_littles_mean_unpinned``).
"""

from __future__ import annotations

import contextlib

from testbed.bench.brokerload import BrokerProcess, ClientPool
from testbed.bench.experiments import Context, Experiment
from testbed.bench.interleave import interleave
from testbed.bench.placement import Placement, cpus_for
from testbed.bench.results import Outcome, Row, figures_of
from testbed.bench.stats import RunFigures

NAME = "sweep"
KEYS = (
    "broker_64_vs_broker_1",
    "broker_64_p99_vs_littles_mean",
    "broker_64_p99_vs_littles_mean_unpinned",
)
TAIL = 64  # clients of the tail ratios


def _tail(rounds: list[RunFigures]) -> list[float]:
    return [r.p99_us / (TAIL / r.ops_per_s * 1e6) for r in rounds]


def run(ctx: Context) -> Outcome:
    out = Outcome()
    arms_of = {
        Placement.UNPINNED: sorted(set(ctx.plan.clients) | {1, TAIL}),
        Placement.SAME_CORE: [1, TAIL],
    }
    with contextlib.ExitStack() as stack:
        arms = {}
        for placement, counts in arms_of.items():
            cpus = cpus_for(placement)
            broker = stack.enter_context(BrokerProcess(ctx.env.file.parent, cpu=cpus.broker))
            for n in counts:
                ctx.log(f"sweep: {n} client(s), {placement.value}")
                pool = stack.enter_context(
                    ClientPool(
                        n, broker, ctx.env.file, cpu=cpus.client, warmup=ctx.plan.warmup // 4 or 1
                    )
                )
                arms[f"{n} clients {placement.value}"] = lambda _rep, p=pool: p.round(
                    ctx.plan.seconds
                )
        runs = interleave(ctx.plan.reps, arms, log=ctx.log, label="sweep")
    for setting, rounds in runs.items():
        out.rows.append(Row(experiment=NAME, transport="broker", setting=setting,
                            figures=figures_of(rounds)))  # fmt: skip
    one, top = runs["1 clients unpinned"], runs[f"{TAIL} clients unpinned"]
    out.ratios["broker_64_vs_broker_1"] = [
        a.ops_per_s / b.ops_per_s for a, b in zip(top, one, strict=True)
    ]
    out.ratios["broker_64_p99_vs_littles_mean"] = _tail(runs[f"{TAIL} clients same-core"])
    out.ratios["broker_64_p99_vs_littles_mean_unpinned"] = _tail(top)
    out.extra["sweep_placement"] = {
        "broker_64_vs_broker_1": Placement.UNPINNED.value,
        "broker_64_p99_vs_littles_mean": Placement.SAME_CORE.value,
    }
    return out


PART = Experiment(name=NAME, run=run, keys=KEYS)
