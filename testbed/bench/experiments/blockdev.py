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

Then a second, shorter pass, the same interleaving, reads the CPU time of
QEMU and of the process serving its opens (the broker daemon, the C server,
the floor) around every ``blockdev-add``: what each side spent on it.
Reading ``/proc`` between operations is harness work the timed pass must not
have, so these figures are their own rows (``CPU pass``).  Set beside the
ping-pong's server CPU per request (same core, back to back), they show
where the hook's added time goes (``qemu_hook_added_vs_broker_cpu``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from testbed.bench.experiments import Context, Experiment
from testbed.bench.experiments.qemus_alive import arm_key, placed, split_key, start_all, usable
from testbed.bench.interleave import ainterleave_figures, ainterleave_rounds
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
#: information, from the CPU pass: (hook - path) time per add / the broker's CPU per add
ADDED_VS_CPU = "qemu_hook_added_vs_broker_cpu"
#: also measured unpinned, as information (``KEY_unpinned``)
UNPINNED_TOO = ("qemu_hook_vs_path", "qemu_hook_c_vs_path")
KEYS = (*RATIOS, *(f"{k}_unpinned" for k in UNPINNED_TOO), ADDED_VS_CPU)


def bench_file(root: Path) -> Path:
    path = root / "files" / "blockdev.img"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.stat().st_size != 1 << 20:
        path.write_bytes(bytes(1 << 20))
    return path


def file_node(launch: Launch, file: Path) -> dict[str, object]:
    """The read-only ``file`` node both passes add, by the name ``launch`` gives ``file``."""
    return {"driver": "file", "filename": launch.name(file), "node-name": "bench",
            "read-only": True}  # fmt: skip


def add_del(qemu: Qemu, launch: Launch, file: Path) -> Callable[[], Awaitable[float]]:
    """One ``blockdev-add`` (timed, seconds) and its ``blockdev-del``."""
    node = file_node(launch, file)

    async def op() -> float:
        took = await qemu.timed("blockdev-add", node)
        await qemu.execute("blockdev-del", {"node-name": "bench"})
        return took

    return op


def add_del_cpu(
    qemu: Qemu, launch: Launch, file: Path
) -> Callable[[], Awaitable[dict[str, float]]]:
    """One ``blockdev-add`` with the CPU QEMU and its server (if it has one of its
    own) spent on it, microseconds, and its ``blockdev-del``."""
    node = file_node(launch, file)
    server = launch.server

    async def op() -> dict[str, float]:
        s0 = server.cpu_ns() if server else 0
        q0 = qemu.cpu_ns()
        took = await qemu.timed("blockdev-add", node)
        q1 = qemu.cpu_ns()
        figures = {"ms": 1000 * took, "qemu_cpu_us_per_op": (q1 - q0) / 1000}
        if server:
            figures["server_cpu_us_per_op"] = (server.cpu_ns() - s0) / 1000
        await qemu.execute("blockdev-del", {"node-name": "bench"})
        return figures

    return op


@dataclass(frozen=True)
class Measured:
    """Seconds per add, arm by arm and repetition by repetition; and, if asked, the CPU
    pass's figures (arm -> figure -> repetitions)."""

    secs: dict[str, list[float]]
    cpu: dict[str, dict[str, list[float]]]


async def measure(ctx: Context, out: Outcome, *, cpu_pass: bool) -> Measured:
    """The timed pass, then (``cpu_pass``) the CPU pass, on one set of running QEMUs."""
    arms = usable(ctx, NAME, out.rows, "1 node", ctx.plan.qemu_versions)
    file = bench_file(ctx.qemu_root)
    async with contextlib.AsyncExitStack() as stack:
        later = {t.name: [file] for t, _ in arms}
        running = await start_all(stack, ctx, arms, {}, later)
        ops = {key: add_del(q, la, file) for key, (q, la) in running.items()}
        for op in ops.values():
            for _ in range(10):  # warm-up
                await op()
        secs = await ainterleave_rounds(
            ctx.plan.reps, ctx.plan.blockdev_ops, ops, log=ctx.log, label="blockdev-add"
        )
        cpu: dict[str, dict[str, list[float]]] = {}
        if cpu_pass and ctx.plan.blockdev_cpu_ops:
            metered = {key: add_del_cpu(q, la, file) for key, (q, la) in running.items()}
            cpu = await ainterleave_figures(
                ctx.plan.reps, ctx.plan.blockdev_cpu_ops, metered, log=ctx.log,
                label="blockdev-add CPU pass",
            )  # fmt: skip
        return Measured(secs, cpu)


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
            measured = asyncio.run(
                measure(ctx, out if not suffix else Outcome(), cpu_pass=not suffix)
            )
        runs = measured.secs
        for key, secs in runs.items():
            name, version = split_key(key)
            out.rows.append(Row(experiment=NAME, transport=name,
                                setting=f"blockdev-add p50, {where}",
                                figures={"ms": spread([1000 * s for s in secs])},
                                qemu_version=version))  # fmt: skip
        cpu_rows(out, measured.cpu, where, ctx.plan.qemu_version)
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
    for version in ctx.plan.qemu_versions:
        key = versioned(ADDED_VS_CPU, version, ctx.plan.qemu_version)
        if key not in out.ratios:
            out.missing[key] = (
                "no CPU pass in this plan" if not ctx.plan.blockdev_cpu_ops
                else f"hook or path did not run on QEMU {version}"
            )  # fmt: skip
    return out


def cpu_rows(
    out: Outcome, cpu: dict[str, dict[str, list[float]]], where: str, primary: str
) -> None:
    """The CPU pass's rows, and per version the hook's added time per add over the
    broker's CPU per add (1: the broker's CPU is all the hook adds)."""
    for key, figures in cpu.items():
        name, version = split_key(key)
        out.rows.append(Row(experiment=NAME, transport=name,
                            setting=f"blockdev-add CPU pass, {where}",
                            figures={k: spread(v) for k, v in figures.items()},
                            qemu_version=version))  # fmt: skip
        path = cpu.get(arm_key("path", version))
        if name == "hook" and path is not None and "server_cpu_us_per_op" in figures:
            added = [1000 * (h - p) for h, p in zip(figures["ms"], path["ms"], strict=True)]
            out.ratios[versioned(ADDED_VS_CPU, version, primary)] = paired_ratios(
                added, figures["server_cpu_us_per_op"]
            )


PART = Experiment(name=NAME, run=run, keys=KEYS)
