"""The benchmark's experiments, run in this order by :mod:`testbed.bench.runner`.

Each is a module with ``run(ctx) -> Outcome``: it interleaves the
transports it compares repetition by repetition and reports, for each goal
it feeds, the list of per-repetition ratios.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from testbed.bench.env import Env
from testbed.bench.plan import Plan
from testbed.bench.transports import Services

Log = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class Context:
    plan: Plan
    env: Env
    services: Services
    qemu_root: Path  # chains, the blockdev-add file and overlays live under here
    log: Log


#: module names under this package, in the order a run goes through them
EXPERIMENTS: dict[str, str] = {
    "pingpong": "pingpong",
    "sweep": "sweep",
    "handover": "handover",
    "blockdev": "blockdev",
    "startup": "startup",
    "snapshot": "snapshot",
    "storm": "storm",
}
