"""Handing QEMU one fd: the hook (broker, one client) against QMP ``add-fd``, both unpinned.

Per repetition, one round of the broker ping-pong and one batch of
``add-fd`` + ``remove-fd`` (open the file, send it with SCM_RIGHTS on the
QMP socket, add it, remove it, close our copy: upstream's way) against a
QEMU kept running; ``hook_vs_qmp_addfd`` pairs their ops/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

from testbed.bench.brokerload import BrokerProcess, ClientPool
from testbed.bench.experiments import Context
from testbed.bench.interleave import interleave
from testbed.bench.qemurun import Launch, Qemu, started
from testbed.bench.qemus import Build, find_qemu, missing
from testbed.bench.results import Outcome, Row, figures_of
from testbed.bench.stats import RunFigures, run_figures

NAME = "handover"
KEYS = ("hook_vs_qmp_addfd",)
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
    key = "hook_vs_qmp_addfd"
    binary = find_qemu(Build.STOCK, ctx.env.qemu_version)
    why = missing(binary, "Debian's QEMU")
    if why:
        out.rows.append(Row(experiment=NAME, transport="qmp_add_fd", setting="unpinned",
                            skipped=why))  # fmt: skip
        out.missing[key] = why
        return out
    loop = asyncio.new_event_loop()
    with contextlib.ExitStack() as stack:
        stack.callback(loop.close)
        broker = stack.enter_context(BrokerProcess(ctx.env.file.parent, cpu=None))
        pool = stack.enter_context(
            ClientPool(1, broker, ctx.env.file, cpu=None, warmup=ctx.plan.warmup)
        )
        cm = started(binary, Launch())
        qemu = loop.run_until_complete(cm.__aenter__())
        stack.callback(lambda: loop.run_until_complete(cm.__aexit__(None, None, None)))
        file = str(ctx.env.file)
        loop.run_until_complete(add_fd_batch(qemu, file, 10))  # warm-up
        arms = {
            "broker": lambda _rep: pool.round(ctx.plan.seconds),
            "qmp_add_fd": lambda _rep: loop.run_until_complete(
                add_fd_batch(qemu, file, ctx.plan.qmp_ops)
            ),
        }
        runs = interleave(ctx.plan.reps, arms, log=ctx.log, label="handover")
    for name, figures in runs.items():
        out.rows.append(Row(experiment=NAME, transport=name, setting="1 client unpinned",
                            figures=figures_of(figures)))  # fmt: skip
    out.ratios[key] = [
        b.ops_per_s / q.ops_per_s for b, q in zip(runs["broker"], runs["qmp_add_fd"], strict=True)
    ]
    return out
