"""Helpers for experiments that keep one QEMU per transport running across repetitions."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from testbed.bench.chain import Chain
from testbed.bench.experiments import Context
from testbed.bench.placement import Placement, cpus_for
from testbed.bench.qemurun import Launch, Qemu, started
from testbed.bench.results import Row
from testbed.bench.transports import TRANSPORTS, Transport

#: a transport on one QEMU version
Arm = tuple[Transport, str]


def arm_key(transport: str, version: str) -> str:
    """``hook@10.0``: how an (transport, version) arm is named in the interleaving."""
    return f"{transport}@{version}"


def split_key(key: str) -> tuple[str, str]:
    """``hook@10.0`` -> (``hook``, ``10.0``)."""
    name, _, version = key.rpartition("@")
    return name, version


def usable(
    ctx: Context, experiment: str, rows: list[Row], setting: str,
    versions: Sequence[str] | None = None,
) -> list[Arm]:  # fmt: skip
    """The plan's transports that can run here on each of ``versions`` (default: the
    plan's first), version by version; a skipped row for each that cannot."""
    out = []
    chosen = TRANSPORTS.select(list(ctx.plan.transports) if ctx.plan.transports else None)
    for version in versions or (ctx.plan.qemu_version,):
        for t in chosen:
            if t.experiments is not None and experiment not in t.experiments:
                continue
            why = t.unavailable(version) or t.unavailable_in(ctx.services)
            if why:
                rows.append(Row(experiment=experiment, transport=t.name, setting=setting,
                                skipped=why, qemu_version=version))  # fmt: skip
            else:
                out.append((t, version))
    return out


async def start_all(
    stack: contextlib.AsyncExitStack, ctx: Context, arms: Sequence[Arm],
    chains: Mapping[str, Chain | None], later: Mapping[str, Sequence[Path]],
) -> dict[str, tuple[Qemu, Launch]]:  # fmt: skip
    """One running QEMU per arm, closed with ``stack``, keyed by :func:`arm_key`;
    ``chains`` and ``later`` are keyed by transport name."""
    out = {}
    for t, version in arms:
        launch = t.launch(ctx.services, chains.get(t.name), later.get(t.name, ()), version=version)
        qemu = await stack.enter_async_context(started(t.binary(version), launch))
        out[arm_key(t.name, version)] = (qemu, launch)
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
