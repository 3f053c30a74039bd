"""CPU placements."""

from __future__ import annotations

import pytest

from testbed.bench.placement import Cpus, Placement, cpus_for


def test_placements_on_two_cpus() -> None:
    assert cpus_for(Placement.SAME_CORE, {2, 3}) == Cpus(broker=2, client=2)
    assert cpus_for(Placement.CROSS_CORE, {2, 3}) == Cpus(broker=2, client=3)
    assert cpus_for(Placement.UNPINNED, {2, 3}) == Cpus(broker=None, client=None)


def test_cross_core_needs_two_cpus() -> None:
    with pytest.raises(ValueError, match="two usable CPUs"):
        cpus_for(Placement.CROSS_CORE, {0})
