"""Interleaved repetitions: A B C A B C ..., so a burst of outside load hits every arm.

An arm is a callable taking the repetition number.  The result holds each
arm's values in repetition order, so value ``i`` of every arm was measured
in the same pass and per-repetition ratios pair them up.
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from testbed.errors import BenchUsageError

T = TypeVar("T")
Log = Callable[[str], None]


def interleave(
    reps: int, arms: Mapping[str, Callable[[int], T]], *, log: Log | None = None, label: str = ""
) -> dict[str, list[T]]:
    """Run every arm once per repetition, in the mapping's order, ``reps`` times."""
    if reps < 1:
        raise BenchUsageError(f"{reps} repetitions")
    out: dict[str, list[T]] = {name: [] for name in arms}
    for rep in range(reps):
        if log is not None:
            log(f"{label} rep {rep + 1}/{reps}: {' '.join(arms)}")
        for name, arm in arms.items():
            out[name].append(arm(rep))
    return out


async def ainterleave(
    reps: int, arms: Mapping[str, Callable[[int], Awaitable[T]]], *, log: Log | None = None,
    label: str = "",
) -> dict[str, list[T]]:  # fmt: skip
    """:func:`interleave` for coroutine arms (one at a time, never concurrently)."""
    if reps < 1:
        raise BenchUsageError(f"{reps} repetitions")
    out: dict[str, list[T]] = {name: [] for name in arms}
    for rep in range(reps):
        if log is not None:
            log(f"{label} rep {rep + 1}/{reps}: {' '.join(arms)}")
        for name, arm in arms.items():
            out[name].append(await arm(rep))
    return out


async def ainterleave_rounds(
    reps: int, rounds: int, arms: Mapping[str, Callable[[], Awaitable[float]]], *,
    log: Log | None = None, label: str = "",
) -> dict[str, list[float]]:  # fmt: skip
    """Repetitions of ``rounds`` samples per arm, the arms alternating sample by sample
    (A B C A B C ... within a repetition too); each repetition's value is its median.

    For short operations (one ``blockdev-add``, one QEMU start) a burst of outside
    load then spreads over every arm instead of landing on one arm's batch.
    """

    def one(arm: Callable[[], Awaitable[float]]) -> Callable[[], Awaitable[dict[str, float]]]:
        async def sample() -> dict[str, float]:
            return {"value": await arm()}

        return sample

    out = await ainterleave_figures(
        reps, rounds, {name: one(arm) for name, arm in arms.items()}, log=log, label=label
    )
    return {name: figures["value"] for name, figures in out.items()}


async def ainterleave_figures(
    reps: int, rounds: int, arms: Mapping[str, Callable[[], Awaitable[Mapping[str, float]]]], *,
    log: Log | None = None, label: str = "",
) -> dict[str, dict[str, list[float]]]:  # fmt: skip
    """:func:`ainterleave_rounds` for arms whose sample is several named figures (a
    time and the CPU it took): arm -> figure -> each repetition's median.  A figure
    an arm's sample leaves out in any round is left out of that arm's result."""
    if rounds < 1:
        raise BenchUsageError(f"{rounds} rounds per repetition")

    def one_rep(_rep: int) -> Callable[[], Awaitable[dict[str, dict[str, float]]]]:
        async def run() -> dict[str, dict[str, float]]:
            samples: dict[str, list[Mapping[str, float]]] = {name: [] for name in arms}
            for _ in range(rounds):
                for name, arm in arms.items():
                    samples[name].append(await arm())
            return {name: _medians(v) for name, v in samples.items()}

        return run

    per_rep = await ainterleave(reps, {"all": lambda rep: one_rep(rep)()}, log=log, label=label)
    out: dict[str, dict[str, list[float]]] = {}
    for name in arms:
        reps_here = [rep[name] for rep in per_rep["all"]]
        common = set.intersection(*(set(r) for r in reps_here))
        out[name] = {k: [r[k] for r in reps_here] for k in reps_here[0] if k in common}
    return out


def _medians(samples: list[Mapping[str, float]]) -> dict[str, float]:
    keys = [k for k in samples[0] if all(k in s for s in samples)]
    return {k: statistics.median(s[k] for s in samples) for k in keys}
