"""Helpers for experiments that keep one QEMU per transport running across repetitions."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from testbed.bench.chain import Chain
from testbed.bench.env import Env
from testbed.bench.experiments import Context
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
