"""The issue's goals: one table, each ratio the median of per-repetition ratios.

The JSON's ``ratios`` object has exactly the keys of :data:`GOALS`, each
with its median, min, max, number of repetitions, goal and whether it was
met (``null`` with a reason when a side was not measured).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from testbed.bench.stats import Spread, spread


class Op(enum.StrEnum):
    AT_MOST = "<="
    AT_LEAST = ">="


@dataclass(frozen=True, kw_only=True)
class Goal:
    key: str
    op: Op
    target: float
    what: str

    def holds(self, value: float) -> bool:
        return value <= self.target if self.op is Op.AT_MOST else value >= self.target

    @property
    def text(self) -> str:
        return f"{self.op.value} {self.target:g}"


GOALS: tuple[Goal, ...] = (
    Goal(key="broker_cpu_vs_python_floor", op=Op.AT_MOST, target=1.25,
         what="broker CPU per request / Python floor's (one client, same core)"),
    Goal(key="qemu_hook_vs_path", op=Op.AT_MOST, target=1.15,
         what="blockdev-add alone: hook (Python broker) / by path"),
    Goal(key="qemu_hook_c_vs_path", op=Op.AT_MOST, target=1.10,
         what="blockdev-add alone: hook (C open-hook-server) / by path"),
    Goal(key="startup_depth64_hook_vs_path", op=Op.AT_MOST, target=1.20,
         what="start to QMP greeting, chain depth 64: hook (Python broker) / by path"),
    Goal(key="storm16_hook_vs_path", op=Op.AT_MOST, target=1.30,
         what="16 QEMUs (depth 4) until all greeted: one broker --socket / by path"),
    Goal(key="hook_vs_qmp_addfd", op=Op.AT_LEAST, target=15,
         what="fds handed over per second: broker / QMP add-fd+remove-fd (both unpinned)"),
    Goal(key="broker_64_vs_broker_1", op=Op.AT_LEAST, target=1.0,
         what="broker throughput, 64 clients / 1 client (unpinned)"),
    Goal(key="broker_64_p99_vs_littles_mean", op=Op.AT_MOST, target=2.0,
         what="p99 latency at 64 clients / (64 / throughput)"),
)  # fmt: skip

KEYS = tuple(g.key for g in GOALS)


@dataclass(frozen=True, kw_only=True)
class Verdict:
    goal: Goal
    value: Spread | None
    reason: str = ""  # why there is no value

    @property
    def met(self) -> bool | None:
        return None if self.value is None else self.goal.holds(self.value.median)

    def as_json(self) -> dict[str, object]:
        d: dict[str, object] = {"goal": self.goal.text, "met": self.met, "what": self.goal.what}
        if self.value is not None:
            d.update(self.value.as_json())
        else:
            d["not_measured"] = self.reason
        return d


def judge(
    per_rep: Mapping[str, Sequence[float]], missing: Mapping[str, str] | None = None
) -> list[Verdict]:
    """A verdict per goal from its per-repetition ratios (``missing``: key -> why absent)."""
    unknown = set(per_rep) - set(KEYS)
    if unknown:
        raise KeyError(f"ratios {sorted(unknown)} are not goals of the benchmark")
    out = []
    for g in GOALS:
        values = per_rep.get(g.key)
        if values:
            out.append(Verdict(goal=g, value=spread(values)))
        else:
            why = (missing or {}).get(g.key, "not measured in this run")
            out.append(Verdict(goal=g, value=None, reason=why))
    return out
