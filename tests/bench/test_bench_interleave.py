"""Interleaving: A B C A B C, and per-repetition values that pair up."""

from __future__ import annotations

import asyncio

import pytest

from testbed.bench.interleave import ainterleave, interleave


def test_arms_alternate_repetition_by_repetition() -> None:
    calls: list[tuple[str, int]] = []

    def arm(name: str):  # type: ignore[no-untyped-def]
        def run(rep: int) -> str:
            calls.append((name, rep))
            return f"{name}{rep}"

        return run

    out = interleave(3, {"A": arm("A"), "B": arm("B"), "C": arm("C")})
    assert [n for n, _ in calls] == list("ABCABCABC")
    assert [r for _, r in calls] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert out == {"A": ["A0", "A1", "A2"], "B": ["B0", "B1", "B2"], "C": ["C0", "C1", "C2"]}


def test_async_arms_alternate_and_never_overlap() -> None:
    running: list[str] = []
    order: list[str] = []

    def arm(name: str):  # type: ignore[no-untyped-def]
        async def run(rep: int) -> int:
            assert not running, f"{name} started while {running} ran"
            running.append(name)
            order.append(name)
            await asyncio.sleep(0)
            running.remove(name)
            return rep

        return run

    out = asyncio.run(ainterleave(2, {"A": arm("A"), "B": arm("B")}))
    assert order == ["A", "B", "A", "B"] and out == {"A": [0, 1], "B": [0, 1]}


@pytest.mark.parametrize("reps", [0, -1])
def test_no_repetitions_is_an_error(reps: int) -> None:
    with pytest.raises(ValueError, match="repetitions"):
        interleave(reps, {"A": lambda r: r})


def test_rounds_alternate_sample_by_sample_and_each_repetition_is_a_median() -> None:
    from testbed.bench.interleave import ainterleave_rounds

    order: list[str] = []
    values = {"A": iter([5.0, 1.0, 3.0, 10.0, 20.0, 30.0]), "B": iter([2.0] * 6)}

    def arm(name: str):  # type: ignore[no-untyped-def]
        async def run() -> float:
            order.append(name)
            return next(values[name])

        return run

    out = asyncio.run(ainterleave_rounds(2, 3, {"A": arm("A"), "B": arm("B")}))
    assert order == list("ABABABABABAB")
    assert out == {"A": [3.0, 20.0], "B": [2.0, 2.0]}
    with pytest.raises(ValueError, match="rounds"):
        asyncio.run(ainterleave_rounds(1, 0, {"A": arm("A")}))


def test_figures_are_medians_per_figure_and_a_figure_some_round_lacks_is_left_out() -> None:
    from testbed.bench.interleave import ainterleave_figures

    order: list[str] = []
    samples = {
        "A": iter([{"ms": 5.0, "cpu": 1.0}, {"ms": 1.0, "cpu": 2.0}, {"ms": 3.0, "cpu": 9.0},
                   {"ms": 7.0, "cpu": 4.0}]),
        "B": iter([{"ms": 2.0, "cpu": 1.0}, {"ms": 2.0}, {"ms": 2.0, "cpu": 1.0},
                   {"ms": 4.0, "cpu": 1.0}]),
    }  # fmt: skip

    def arm(name: str):  # type: ignore[no-untyped-def]
        async def run() -> dict[str, float]:
            order.append(name)
            return next(samples[name])

        return run

    out = asyncio.run(ainterleave_figures(2, 2, {"A": arm("A"), "B": arm("B")}))
    assert order == list("ABABABAB")
    assert out["A"] == {"ms": [3.0, 5.0], "cpu": [1.5, 6.5]}
    assert out["B"] == {"ms": [2.0, 3.0]}  # B's first repetition had a round without cpu
    with pytest.raises(ValueError, match="rounds"):
        asyncio.run(ainterleave_figures(1, 0, {"A": arm("A")}))
