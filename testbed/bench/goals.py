"""The ratios, issue 16's goals and information: each the median of per-repetition ratios.

The JSON's ``ratios`` object has the keys of :data:`GOALS` then those of
:data:`INFORMATION` (no goal: ``"goal": "information"``, ``"met": null``),
each with its median, min, max, number of repetitions, goal and whether it
was met (``null`` with a reason when a side was not measured).  A ratio
measured on several QEMU versions keeps its key for the run's first
version and gains ``KEY@VERSION`` entries for the others, right after it
(:func:`testbed.bench.qemus.versioned`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from testbed.bench.stats import Spread, spread
from testbed.errors import UnknownPartError


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
         what="p99 latency at 64 clients / (64 / throughput) (broker and clients on one core)"),
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Information:
    """A ratio reported without a goal (what it is, for the reader to judge)."""

    key: str
    what: str


INFORMATION: tuple[Information, ...] = (
    Information(key="seccomp_open_vs_plain",
                what="time per openat+close of a C child: under the supervisor / unsupervised "
                     "(same core)"),
    Information(key="seccomp_open_vs_hook_c",
                what="time per open: the supervised C child's openat+close / one hook round trip "
                     "to the C open-hook-server (same core)"),
    Information(key="seccomp_open_vs_hook",
                what="time per open: the supervised C child's openat+close / one hook round trip "
                     "to the Python broker (same core)"),
    Information(key="startup_supervised_vs_plain",
                what="start to QMP greeting, chain depth 1, stock QEMU: under the supervisor / "
                     "plain"),
    Information(key="startup_landlock_vs_plain",
                what="start to QMP greeting, chain depth 1, stock QEMU: under the supervisor and "
                     "Landlock / plain"),
    Information(key="qemu_hook_vs_path_unpinned",
                what="blockdev-add alone: hook (Python broker) / by path, unpinned (the "
                     "virtual machine's cross-vCPU wake-ups included)"),
    Information(key="qemu_hook_c_vs_path_unpinned",
                what="blockdev-add alone: hook (C open-hook-server) / by path, unpinned"),
    Information(key="qemu_hook_floor_vs_path",
                what="blockdev-add alone: hook to the Python floor (the broker's system calls, "
                     "nothing else) / by path"),
    Information(key="qemu_hook_vs_hook_floor",
                what="blockdev-add alone: hook to the Python broker / to the Python floor"),
    Information(key="qemu_hook_added_vs_broker_cpu",
                what="blockdev-add, CPU pass: (hook - by path) time per add / the broker's CPU "
                     "per add (1: the hook adds exactly what the broker spends)"),
    Information(key="broker_64_p99_vs_littles_mean_unpinned",
                what="p99 latency at 64 clients / (64 / throughput), unpinned: mostly the "
                     "virtual machine's wake-ups of idle vCPUs"),
    Information(key="blockdev_add_supervised_vs_path",
                what="blockdev-add of a file node, stock QEMU: under the supervisor / by path"),
)  # fmt: skip

KEYS = tuple(g.key for g in GOALS) + tuple(i.key for i in INFORMATION)
_WHAT: dict[str, Goal | Information] = {g.key: g for g in GOALS} | {i.key: i for i in INFORMATION}


def base_key(key: str) -> str:
    """``qemu_hook_vs_path@10.0`` -> ``qemu_hook_vs_path``."""
    return key.partition("@")[0]


@dataclass(frozen=True, kw_only=True)
class Verdict:
    key: str  # the ratio's key, ``@VERSION`` included
    goal: Goal | None  # None: an information ratio
    what: str
    value: Spread | None
    reason: str = ""  # why there is no value

    @property
    def met(self) -> bool | None:
        if self.value is None or self.goal is None:
            return None
        return self.goal.holds(self.value.median)

    @property
    def text(self) -> str:
        return "information" if self.goal is None else self.goal.text

    def to_json(self) -> dict[str, object]:
        d: dict[str, object] = {"goal": self.text, "met": self.met, "what": self.what}
        if self.value is not None:
            d.update(self.value.to_json())
        else:
            d["not_measured"] = self.reason
        return d


def judge(
    per_rep: Mapping[str, Sequence[float]], missing: Mapping[str, str] | None = None
) -> list[Verdict]:
    """A verdict per ratio from its per-repetition values (``missing``: key -> why absent).

    Every key of :data:`KEYS` gets one, in that order, each followed by its
    ``@VERSION`` entries that were measured or are missing.
    """
    missing = missing or {}
    unknown = {k for k in (*per_rep, *missing) if base_key(k) not in _WHAT}
    if unknown:
        raise UnknownPartError(f"ratios {sorted(unknown)} are not ratios of the benchmark")
    out = []
    for key in KEYS:
        versions = [k for k in dict.fromkeys((*per_rep, *missing)) if base_key(k) == key != k]
        for k in (key, *versions):
            ratio = _WHAT[key]
            goal = ratio if isinstance(ratio, Goal) else None
            values = per_rep.get(k)
            if values:
                out.append(Verdict(key=k, goal=goal, what=ratio.what, value=spread(values)))
            else:
                why = missing.get(k, "not measured in this run")
                out.append(Verdict(key=k, goal=goal, what=ratio.what, value=None, reason=why))
    return out
