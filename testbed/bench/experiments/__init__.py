"""The benchmark's experiments, run in registration order by :mod:`testbed.bench.runner`.

Each is a module defining ``PART``, an :class:`Experiment` whose ``run(ctx)
-> Outcome`` interleaves the transports it compares repetition by repetition
and reports, for each ratio it feeds, the list of per-repetition ratios.
Adding one is a module plus one line in :data:`EXPERIMENTS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from testbed.bench.env import Env
from testbed.bench.plan import Plan
from testbed.bench.registry import Registry
from testbed.bench.results import Outcome
from testbed.bench.transports import Services

Log = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class Context:
    plan: Plan
    env: Env
    services: Services
    qemu_root: Path  # chains, the blockdev-add file and overlays live under here
    log: Log


@dataclass(frozen=True, kw_only=True)
class Experiment:
    """One experiment: its name, what it runs, and the ratio keys it feeds."""

    name: str
    run: Callable[[Context], Outcome]
    #: the ratios it feeds: "not measured" with the error when it fails
    keys: tuple[str, ...] = ()


#: name -> module under this package, in the order a run goes through them
EXPERIMENTS: Registry[Experiment] = Registry(
    __name__,
    {
        "pingpong": "pingpong",
        "sweep": "sweep",
        "handover": "handover",
        "blockdev": "blockdev",
        "startup": "startup",
        "snapshot": "snapshot",
        "storm": "storm",
    },
    Experiment,
)
