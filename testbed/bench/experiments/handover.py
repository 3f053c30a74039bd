"""Handing QEMU one fd: the hook (broker, one client) against QMP ``add-fd``, both unpinned.

Per repetition, one round of the broker ping-pong and, for each QEMU version
of the plan, one batch of ``add-fd`` + ``remove-fd`` (open the file, send it
with SCM_RIGHTS on the QMP socket, add it, remove it, close our copy:
upstream's way) against a stock QEMU of that version kept running;
``hook_vs_qmp_addfd`` pairs the broker's ops/s with the first version's,
``hook_vs_qmp_addfd@VERSION`` with each other version's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from testbed.bench.brokerload import BrokerProcess, ClientPool
from testbed.bench.experiments import Context, Experiment
from testbed.bench.experiments.qemus_alive import arm_key, split_key
from testbed.bench.interleave import interleave
from testbed.bench.qemurun import Launch, Qemu, started
from testbed.bench.qemus import Build, find_qemu, missing, versioned
from testbed.bench.results import Outcome, Row, figures_of
from testbed.bench.stats import RunFigures, run_figures

NAME = "handover"
KEY = "hook_vs_qmp_addfd"
KEYS = (KEY,)
FDSET_ID = 7


async def add_fd_batch(qemu: Qemu, file: str, ops: int) -> RunFigures:
    latencies = []
    begin = t0 = time.monotonic_ns()
    for _ in range(ops):
        fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            qemu.send_fd(fd)
            answer = await qemu.execute("add-fd", {"fdset-id": FDSET_ID})
        finally:
            os.close(fd)
        await qemu.execute("remove-fd", {"fdset-id": FDSET_ID, "fd": answer["fd"]})
        t1 = time.monotonic_ns()
        latencies.append(t1 - t0)
        t0 = t1
    return run_figures(latencies, (t0 - begin) / 1e9)


def run(ctx: Context) -> Outcome:
    out = Outcome()
    binaries = {}
    for version in ctx.plan.qemu_versions:
        ratio = versioned(KEY, version, ctx.plan.qemu_version)
        binary = find_qemu(Build.STOCK, version)
        why = missing(binary, f"stock QEMU {version}")
        if why:
            out.rows.append(Row(experiment=NAME, transport="qmp_add_fd", setting="unpinned",
                                skipped=why, qemu_version=version))  # fmt: skip
            out.missing[ratio] = why
        else:
            binaries[version] = binary
    if not binaries:
        return out
    runs = measure(ctx, binaries)
    for name, figures in runs.items():
        transport, version = split_key(name) if "@" in name else (name, "")
        out.rows.append(Row(experiment=NAME, transport=transport, setting="1 client unpinned",
                            figures=figures_of(figures), qemu_version=version))  # fmt: skip
    for version in binaries:
        out.ratios[versioned(KEY, version, ctx.plan.qemu_version)] = [
            b.ops_per_s / q.ops_per_s
            for b, q in zip(runs["broker"], runs[arm_key("qmp_add_fd", version)], strict=True)
        ]
    return out


@contextlib.contextmanager
def running_qemu(loop: asyncio.AbstractEventLoop, binary: Path) -> Iterator[Qemu]:
    """A QEMU started (and stopped) on ``loop``, for the synchronous interleaving."""
    cm = started(binary, Launch())
    qemu = loop.run_until_complete(cm.__aenter__())
    try:
        yield qemu
    finally:
        loop.run_until_complete(cm.__aexit__(None, None, None))


def batches(
    loop: asyncio.AbstractEventLoop, qemu: Qemu, file: str, ops: int
) -> Callable[[int], RunFigures]:
    def arm(_rep: int) -> RunFigures:
        return loop.run_until_complete(add_fd_batch(qemu, file, ops))

    return arm


def measure(ctx: Context, binaries: dict[str, Path]) -> dict[str, list[RunFigures]]:
    """The broker's rounds and each version's ``add-fd`` batches, interleaved."""
    loop = asyncio.new_event_loop()
    with contextlib.ExitStack() as stack:
        stack.callback(loop.close)
        broker = stack.enter_context(BrokerProcess(ctx.env.file.parent, cpu=None))
        pool = stack.enter_context(
            ClientPool(1, broker, ctx.env.file, cpu=None, warmup=ctx.plan.warmup)
        )
        file = str(ctx.env.file)
        arms: dict[str, Callable[[int], RunFigures]] = {
            "broker": lambda _rep: pool.round(ctx.plan.seconds)
        }
        for version, binary in binaries.items():
            qemu = stack.enter_context(running_qemu(loop, binary))
            loop.run_until_complete(add_fd_batch(qemu, file, 10))  # warm-up
            arms[arm_key("qmp_add_fd", version)] = batches(loop, qemu, file, ctx.plan.qmp_ops)
        return interleave(ctx.plan.reps, arms, log=ctx.log, label="handover")


PART = Experiment(name=NAME, run=run, keys=KEYS)
