"""``blockdev-snapshot-sync`` latency, every transport, on a chain of ``snapshot_depth``.

One QEMU per transport, each on its own copy of the chain (two QEMUs may
not hold one image read-write); each repetition takes one external
snapshot of the current top into a new overlay (QEMU creates it: the hook
sees the creating open; for fd sets the overlay is made empty and passed
beforehand, as libvirt does) and times the command's round trip.  A raw
filter node holds the chain's top, as a guest device would, or the
replaced top and its new overlay would have no user and be dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

from testbed.bench.chain import make_chain
from testbed.bench.experiments import Context, Experiment
from testbed.bench.experiments.qemus_alive import placed, split_key, start_all, usable
from testbed.bench.interleave import ainterleave
from testbed.bench.qemurun import Launch, Qemu
from testbed.bench.results import Outcome, Row
from testbed.bench.stats import spread

NAME = "snapshot"


def overlays(root: Path, transport: str, reps: int) -> list[Path]:
    return [root / "overlays" / transport / f"s{rep}.qcow2" for rep in range(reps)]


async def measure(ctx: Context, out: Outcome) -> dict[str, list[float]]:
    arms = usable(ctx, NAME, out.rows, f"depth {ctx.plan.snapshot_depth}")
    shutil.rmtree(ctx.qemu_root / "overlays", ignore_errors=True)
    chains = {}
    later: dict[str, list[Path]] = {}
    for t, _ in arms:
        chains[t.name] = make_chain(ctx.qemu_root / "snapshot" / t.name, ctx.plan.snapshot_depth)
        later[t.name] = overlays(ctx.qemu_root, t.name, ctx.plan.reps)
        later[t.name][0].parent.mkdir(parents=True)
        if t.name == "fdset":
            for p in later[t.name]:
                p.touch()  # libvirt creates what it will pass
    async with contextlib.AsyncExitStack() as stack:
        running = await start_all(stack, ctx, arms, dict(chains), later)
        for qemu, _ in running.values():
            # A node nobody holds goes away once a snapshot replaces it: a raw
            # filter on top holds the chain, as a device would.
            await qemu.execute("blockdev-add", {"driver": "raw", "node-name": "holder",
                                                "file": "top"})  # fmt: skip

        async def snap(name: str, rep: int, qemu: Qemu, launch: Launch) -> float:
            args = {
                "node-name": "top" if rep == 0 else f"s{rep - 1}",
                "snapshot-node-name": f"s{rep}",
                "snapshot-file": launch.name(later[name][rep]),
                "format": "qcow2",
            }
            return await qemu.timed("blockdev-snapshot-sync", args)

        snaps = {}
        for key, (q, la) in running.items():
            name = split_key(key)[0]
            snaps[name] = lambda rep, n=name, q=q, la=la: snap(n, rep, q, la)
        return await ainterleave(ctx.plan.reps, snaps, log=ctx.log, label="snapshot")


def run(ctx: Context) -> Outcome:
    out = Outcome()
    with placed(ctx, ctx.plan.qemu_placement) as where:
        runs = asyncio.run(measure(ctx, out))
    for name, secs in runs.items():
        out.rows.append(Row(experiment=NAME, transport=name,
                            setting=f"depth {ctx.plan.snapshot_depth}+, {where}",
                            figures={"ms": spread([1000 * s for s in secs])},
                            qemu_version=ctx.plan.qemu_version))  # fmt: skip
    if "path" in runs:
        out.extra["snapshot_vs_path"] = {
            n: spread([a / b for a, b in zip(s, runs["path"], strict=True)]).to_json(3)
            for n, s in runs.items()
            if n != "path"
        }
    return out


PART = Experiment(name=NAME, run=run, keys=())
