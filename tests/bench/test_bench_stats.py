"""Statistics helpers of the benchmark."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.bench.stats import RunFigures, percentile, run_figures, summarise


def test_percentile_nearest_rank() -> None:
    values = [float(x) for x in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    assert percentile([7.0], 99) == 7


@given(st.lists(st.integers(0, 10**9), min_size=1), st.floats(0, 100), st.floats(0, 100))
def test_percentile_is_a_sample_and_monotone(values: list[int], q1: float, q2: float) -> None:
    ordered = sorted(values)
    lo, hi = sorted((q1, q2))
    assert percentile(ordered, lo) in ordered
    assert percentile(ordered, lo) <= percentile(ordered, hi)


@pytest.mark.parametrize(("values", "q"), [([], 50), ([1.0], 101), ([1.0], -1)])
def test_percentile_rejects_bad_input(values: list[float], q: float) -> None:
    with pytest.raises(ValueError):
        percentile(values, q)


def test_run_figures_in_microseconds() -> None:
    lat = [10_000] * 98 + [50_000, 900_000]  # ns
    r = run_figures(lat, 0.5, broker_cpu_s=0.01)
    assert r.ops == 100
    assert r.ops_per_s == 200
    assert r.p50_us == 10
    assert r.p99_us == 50
    with pytest.raises(ValueError, match="0 s"):
        run_figures(lat, 0)


def test_summary_reports_median_and_spread() -> None:
    runs = [
        RunFigures(ops=1000, seconds=1, p50_us=10, p95_us=20, p99_us=30, broker_cpu_s=0.002),
        RunFigures(ops=3000, seconds=1, p50_us=12, p95_us=22, p99_us=90, broker_cpu_s=0.009),
        RunFigures(ops=2000, seconds=1, p50_us=11, p95_us=21, p99_us=35, broker_cpu_s=0.004),
    ]
    s = summarise(runs)
    assert (s.ops_per_s, s.ops_per_s_min, s.ops_per_s_max) == (2000, 1000, 3000)
    assert s.noise_pct == 100
    assert (s.p50_us, s.p99_us) == (11, 35)
    assert s.broker_cpu_us_per_op == 2  # medians of 2, 3 and 2 us per op
    assert s.reps == 3
    with pytest.raises(ValueError):
        summarise([])


def test_spread_is_median_min_max() -> None:
    from testbed.bench.stats import spread

    s = spread([3.0, 1.0, 2.0, 10.0])
    assert (s.median, s.low, s.high, s.n) == (2.5, 1.0, 10.0, 4)
    with pytest.raises(ValueError):
        spread([])


def test_paired_ratios_pair_repetitions() -> None:
    from testbed.bench.stats import paired_ratios

    assert paired_ratios([2.0, 9.0], [1.0, 3.0]) == [2.0, 3.0]
    with pytest.raises(ValueError, match="2 numerators against 1"):
        paired_ratios([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="zero"):
        paired_ratios([1.0], [0.0])
