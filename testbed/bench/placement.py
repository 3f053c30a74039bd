"""Where the broker and its clients run.

On virtual machines a cross-core wake-up costs tens of microseconds, more
than the whole exchange on one core (DESIGN.md section 5), so every figure
is taken under a named placement and ratios compare like with like.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from testbed.errors import BenchUsageError


class Placement(enum.Enum):
    SAME_CORE = "same-core"  # broker and client(s) pinned to one CPU
    CROSS_CORE = "cross-core"  # broker on one CPU, client(s) on another
    UNPINNED = "unpinned"  # the scheduler decides


@dataclass(frozen=True, kw_only=True)
class Cpus:
    """The CPU for the broker and for the clients; ``None`` leaves one unpinned."""

    broker: int | None
    client: int | None


def cpus_for(placement: Placement, usable: set[int] | None = None) -> Cpus:
    """Concrete CPUs for ``placement`` among ``usable`` (default: this process's)."""
    cpus = sorted(os.sched_getaffinity(0) if usable is None else usable)
    if placement is Placement.UNPINNED:
        return Cpus(broker=None, client=None)
    if placement is Placement.SAME_CORE:
        return Cpus(broker=cpus[0], client=cpus[0])
    if len(cpus) < 2:
        raise BenchUsageError(f"cross-core placement needs two usable CPUs, have {cpus}")
    return Cpus(broker=cpus[0], client=cpus[1])


def pin(pid: int, cpu: int | None) -> None:
    """Pin process ``pid`` (0: this one) to ``cpu``; ``None`` lets it run anywhere."""
    os.sched_setaffinity(pid, os.sched_getaffinity(0) if cpu is None else {cpu})
