"""``blockdev-add`` of a read-only ``file`` node (then ``blockdev-del``), every transport,
on every QEMU version of the plan.

One QEMU per (transport, version) runs for the whole experiment; each
repetition is ``blockdev_ops`` rounds of one add + del per arm in turn (A B
C A B C within the repetition too, the versions side by side).  The figure
is ``blockdev-add`` alone (the repetition's median): what attaching a disk
costs.  Per version, ``qemu_hook_vs_path`` and ``qemu_hook_c_vs_path`` pair
each repetition's hook figure with the by-path one (same patched binary),
``blockdev_add_supervised_vs_path`` the supervised stock binary's with the
same binary by path (``path_debian``); the run's first version has the
plain keys, the others ``KEY@VERSION``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path

from testbed.bench.experiments import Context, Experiment
from testbed.bench.experiments.qemus_alive import arm_key, placed, split_key, start_all, usable
from testbed.bench.interleave import ainterleave_rounds
from testbed.bench.placement import Placement
from testbed.bench.qemurun import Launch, Qemu
from testbed.bench.qemus import versioned
from testbed.bench.results import Outcome, Row
from testbed.bench.stats import paired_ratios, spread

NAME = "blockdev"
#: ratio key -> (numerator, denominator) transports, per version
RATIOS = {
    "qemu_hook_vs_path": ("hook", "path"),
    "qemu_hook_c_vs_path": ("hook_c", "path"),
    "qemu_hook_floor_vs_path": ("hook_floor", "path"),
    "qemu_hook_vs_hook_floor": ("hook", "hook_floor"),
    "blockdev_add_supervised_vs_path": ("seccomp", "path_debian"),
}
#: also measured unpinned, as information (``KEY_unpinned``)
UNPINNED_TOO = ("qemu_hook_vs_path", "qemu_hook_c_vs_path")
KEYS = tuple(RATIOS) + tuple(f"{k}_unpinned" for k in UNPINNED_TOO)


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
    arms = usable(ctx, NAME, out.rows, "1 node", ctx.plan.qemu_versions)
    file = bench_file(ctx.qemu_root)
    async with contextlib.AsyncExitStack() as stack:
        later = {t.name: [file] for t, _ in arms}
        running = await start_all(stack, ctx, arms, {}, later)
        ops = {key: add_del(q, la, file) for key, (q, la) in running.items()}
        for op in ops.values():
            for _ in range(10):  # warm-up
                await op()
        return await ainterleave_rounds(
            ctx.plan.reps, ctx.plan.blockdev_ops, ops, log=ctx.log, label="blockdev-add"
        )


def run(ctx: Context) -> Outcome:
    """Under the plan's QEMU placement (the goal ratios); then, if that was not
    unpinned and the plan asks for it, again unpinned (the ``_unpinned``
    information ratios), so the cost of the hypervisor's cross-vCPU wake-ups
    stays visible beside the hook's own."""
    out = Outcome()
    placements = [ctx.plan.qemu_placement]
    if ctx.plan.blockdev_unpinned and ctx.plan.qemu_placement is not Placement.UNPINNED:
        placements.append(Placement.UNPINNED)
    if len(placements) == 1:
        why = (
            "the goal ratios were taken unpinned"
            if ctx.plan.qemu_placement is Placement.UNPINNED
            else "not measured in this plan (--quick)"
        )
        for version in ctx.plan.qemu_versions:
            for key in UNPINNED_TOO:
                out.missing[versioned(f"{key}_unpinned", version, ctx.plan.qemu_version)] = why
    for placement in placements:
        suffix = "" if placement is ctx.plan.qemu_placement else "_unpinned"
        with placed(ctx, placement) as where:
            runs = asyncio.run(measure(ctx, out if not suffix else Outcome()))
        for key, secs in runs.items():
            name, version = split_key(key)
            out.rows.append(Row(experiment=NAME, transport=name,
                                setting=f"blockdev-add p50, {where}",
                                figures={"ms": spread([1000 * s for s in secs])},
                                qemu_version=version))  # fmt: skip
        for version in ctx.plan.qemu_versions:
            for key, (num, den) in RATIOS.items():
                if suffix and key not in UNPINNED_TOO:
                    continue
                ratio = versioned(key + suffix, version, ctx.plan.qemu_version)
                a, b = runs.get(arm_key(num, version)), runs.get(arm_key(den, version))
                if a and b:
                    out.ratios[ratio] = paired_ratios(a, b)
                else:
                    out.missing[ratio] = f"{num} or {den} did not run on QEMU {version}"
    return out


PART = Experiment(name=NAME, run=run, keys=KEYS)
