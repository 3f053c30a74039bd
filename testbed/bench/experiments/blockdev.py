"""``blockdev-add`` of a read-only ``file`` node (then ``blockdev-del``), every transport.

One QEMU per transport runs for the whole experiment; each repetition is
``blockdev_ops`` rounds of one add + del per transport in turn (A B C A B C
within the repetition too).  The figure is ``blockdev-add`` alone (the
repetition's median): what attaching a disk costs.
``qemu_hook_vs_path`` and ``qemu_hook_c_vs_path`` pair each repetition's
hook figure with the by-path one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path

from testbed.bench.experiments import Context
from testbed.bench.experiments.qemus_alive import placed, start_all, usable
from testbed.bench.interleave import ainterleave_rounds
from testbed.bench.qemurun import Launch, Qemu
from testbed.bench.results import Outcome, Row
from testbed.bench.stats import paired_ratios, spread

NAME = "blockdev"
RATIOS = {"qemu_hook_vs_path": "hook", "qemu_hook_c_vs_path": "hook_c"}
KEYS = tuple(RATIOS)


def bench_file(root: Path) -> Path:
    path = root / "files" / "blockdev.img"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.stat().st_size != 1 << 20:
        path.write_bytes(bytes(1 << 20))
    return path


def add_del(qemu: Qemu, launch: Launch, file: Path) -> Callable[[], Awaitable[float]]:
    """One ``blockdev-add`` (timed, seconds) and its ``blockdev-del``."""
    node = {"driver": "file", "filename": launch.name(file), "node-name": "bench",
            "read-only": True}  # fmt: skip

    async def op() -> float:
        took = await qemu.timed("blockdev-add", node)
        await qemu.execute("blockdev-del", {"node-name": "bench"})
        return took

    return op


async def measure(ctx: Context, out: Outcome) -> dict[str, list[float]]:
    transports = usable(ctx, NAME, out.rows, "1 node")
    file = bench_file(ctx.qemu_root)
    async with contextlib.AsyncExitStack() as stack:
        later = {t.name: [file] for t in transports}
        running = await start_all(stack, ctx, transports, {}, later)
        arms = {name: add_del(q, la, file) for name, (q, la) in running.items()}
        for op in arms.values():
            for _ in range(10):  # warm-up
                await op()
        return await ainterleave_rounds(
            ctx.plan.reps, ctx.plan.blockdev_ops, arms, log=ctx.log, label="blockdev-add"
        )


def run(ctx: Context) -> Outcome:
    out = Outcome()
    with placed(ctx, ctx.plan.qemu_placement) as where:
        runs = asyncio.run(measure(ctx, out))
    for name, secs in runs.items():
        out.rows.append(Row(experiment=NAME, transport=name, setting=f"blockdev-add p50, {where}",
                            figures={"ms": spread([1000 * s for s in secs])}))  # fmt: skip
    for key, hook in RATIOS.items():
        if hook in runs and "path" in runs:
            out.ratios[key] = paired_ratios(runs[hook], runs["path"])
        else:
            out.missing[key] = f"{hook} or path did not run"
    return out
