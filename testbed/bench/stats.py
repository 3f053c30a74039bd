"""Summaries of latency samples and of repeated runs.

Latencies are nanosecond integers; figures reported are microseconds.  A
repeated measurement is summarised by the median of its repetitions and the
spread (min, max) around it, so run-to-run noise shows instead of being
averaged away.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from testbed.errors import BenchUsageError


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already sorted values, nearest-rank.

    Nearest-rank keeps every reported latency one that really happened.
    """
    if not sorted_values:
        raise BenchUsageError("percentile of no samples")
    if not 0 <= q <= 100:
        raise BenchUsageError(f"percentile {q} outside 0..100")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


@dataclass(frozen=True, kw_only=True)
class RunFigures:
    """One repetition: how many ops in how long, and their latency percentiles."""

    ops: int
    seconds: float
    p50_us: float
    p95_us: float
    p99_us: float
    broker_cpu_s: float | None = None

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds


def run_figures(
    latencies_ns: Sequence[int], seconds: float, *, broker_cpu_s: float | None = None
) -> RunFigures:
    """Summarise one repetition's per-op latencies over ``seconds`` of wall time."""
    if seconds <= 0:
        raise BenchUsageError(f"run of {seconds} s")
    ordered = sorted(latencies_ns)
    return RunFigures(
        ops=len(ordered),
        seconds=seconds,
        p50_us=percentile(ordered, 50) / 1000,
        p95_us=percentile(ordered, 95) / 1000,
        p99_us=percentile(ordered, 99) / 1000,
        broker_cpu_s=broker_cpu_s,
    )


@dataclass(frozen=True, kw_only=True)
class Summary:
    """Repetitions of one measurement: medians, and the ops/s spread across runs."""

    reps: int
    ops_per_s: float
    ops_per_s_min: float
    ops_per_s_max: float
    p50_us: float
    p95_us: float
    p99_us: float
    broker_cpu_us_per_op: float | None

    @property
    def noise_pct(self) -> float:
        """(max - min) / median of ops/s across repetitions, in percent."""
        return 100 * (self.ops_per_s_max - self.ops_per_s_min) / self.ops_per_s


def summarise(runs: Sequence[RunFigures]) -> Summary:
    """Median of each figure across repetitions; ops/s spread as min and max."""
    if not runs:
        raise BenchUsageError("summary of no runs")
    rates = [r.ops_per_s for r in runs]
    cpu = [1e6 * r.broker_cpu_s / r.ops for r in runs if r.broker_cpu_s is not None and r.ops]
    return Summary(
        reps=len(runs),
        ops_per_s=statistics.median(rates),
        ops_per_s_min=min(rates),
        ops_per_s_max=max(rates),
        p50_us=statistics.median(r.p50_us for r in runs),
        p95_us=statistics.median(r.p95_us for r in runs),
        p99_us=statistics.median(r.p99_us for r in runs),
        broker_cpu_us_per_op=statistics.median(cpu) if cpu else None,
    )


@dataclass(frozen=True, kw_only=True)
class Spread:
    """A median with the min and max it came from, over ``n`` values."""

    median: float
    low: float
    high: float
    n: int

    def to_json(self, digits: int = 4) -> dict[str, float | int]:
        return {
            "median": round(self.median, digits),
            "min": round(self.low, digits),
            "max": round(self.high, digits),
            "reps": self.n,
        }


def spread(values: Sequence[float]) -> Spread:
    if not values:
        raise BenchUsageError("spread of no values")
    return Spread(
        median=statistics.median(values), low=min(values), high=max(values), n=len(values)
    )


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """``num[i] / den[i]`` for each repetition i: both sides of a ratio from one repetition.

    Repetitions must pair up (same count); a zero denominator is an error,
    not an infinite ratio.
    """
    if len(num) != len(den):
        raise BenchUsageError(f"{len(num)} numerators against {len(den)} denominators")
    if any(d == 0 for d in den):
        raise BenchUsageError("a repetition with a zero denominator")
    return [a / b for a, b in zip(num, den, strict=True)]
