"""Helpers for experiments that keep one QEMU per transport running across repetitions."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from testbed.bench.chain import Chain
from testbed.bench.env import Env
from testbed.bench.experiments import Context
from testbed.bench.placement import Placement, cpus_for
from testbed.bench.qemurun import Launch, Qemu, started
from testbed.bench.results import Row
from testbed.bench.transports import TRANSPORTS, Transport


def usable(ctx: Context, experiment: str, rows: list[Row], setting: str) -> list[Transport]:
    """The plan's transports that can run here; a skipped row for each that cannot."""
    out = []
    for t in TRANSPORTS.select(list(ctx.plan.transports) if ctx.plan.transports else None):
        why = t.unavailable(ctx.env)
        if why:
            rows.append(Row(experiment=experiment, transport=t.name, setting=setting, skipped=why))
        else:
            out.append(t)
    return out


async def start_all(
    stack: contextlib.AsyncExitStack, ctx: Context, transports: Sequence[Transport],
    chains: Mapping[str, Chain | None], later: Mapping[str, Sequence[Path]],
) -> dict[str, tuple[Qemu, Launch]]:  # fmt: skip
    """One running QEMU per transport, closed with ``stack``."""
    env: Env = ctx.env
    out = {}
    for t in transports:
        launch = t.launch(ctx.services, chains.get(t.name), later.get(t.name, ()))
        qemu = await stack.enter_async_context(started(t.binary(env), launch))
        out[t.name] = (qemu, launch)
    return out


@contextlib.contextmanager
def placed(ctx: Context, placement: Placement) -> Iterator[str]:
    """Run the harness (and so every QEMU and C server it spawns) and the broker
    daemon under ``placement``; the harness's own affinity comes back afterwards.
    Yields the placement's name for the rows."""
    saved = os.sched_getaffinity(0)
    cpu = cpus_for(placement).broker
    try:
        os.sched_setaffinity(0, saved if cpu is None else {cpu})
        ctx.services.broker().pin(cpu)
        yield placement.value
    finally:
        os.sched_setaffinity(0, saved)
        ctx.services.broker().pin(None)
