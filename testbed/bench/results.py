"""What an experiment hands back: table rows, per-repetition ratios, extra figures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from testbed.bench.stats import RunFigures, Spread, spread
from testbed.errors import BenchUsageError


@dataclass(frozen=True, kw_only=True)
class Row:
    """One measured cell: a transport under a setting, each figure with its spread."""

    experiment: str
    transport: str
    setting: str  # "same-core", "depth 64", "16 QEMUs", ...
    figures: dict[str, Spread] = field(default_factory=dict)
    skipped: str = ""
    qemu_version: str = ""  # the QEMU it ran ("" for rows without one)

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What tells this row from every other one of a run."""
        return (self.experiment, self.transport, self.qemu_version, self.setting)

    def to_json(self) -> dict[str, object]:
        d: dict[str, object] = {
            "experiment": self.experiment,
            "transport": self.transport,
            "setting": self.setting,
        }
        if self.qemu_version:
            d["qemu_version"] = self.qemu_version
        if self.skipped:
            d["skipped"] = self.skipped
        else:
            d["figures"] = {k: v.to_json(2) for k, v in self.figures.items()}
        return d


@dataclass(kw_only=True)
class Outcome:
    """An experiment's rows, its contributions to the goal ratios, and extras."""

    rows: list[Row] = field(default_factory=list)
    ratios: dict[str, list[float]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)

    def merge(self, other: Outcome) -> None:
        self.rows += other.rows
        self.ratios.update(other.ratios)
        self.missing.update(other.missing)
        self.extra.update(other.extra)


def figures_of(runs: Sequence[RunFigures]) -> dict[str, Spread]:
    """ops/s, latency percentiles and server CPU per op across repetitions."""
    out = {
        "ops_per_s": spread([r.ops_per_s for r in runs]),
        "p50_us": spread([r.p50_us for r in runs]),
        "p99_us": spread([r.p99_us for r in runs]),
    }
    cpu = [1e6 * r.broker_cpu_s / r.ops for r in runs if r.broker_cpu_s is not None and r.ops]
    if len(cpu) == len(runs):
        out["server_cpu_us_per_op"] = spread(cpu)
    return out


def server_cpu_us(runs: Sequence[RunFigures]) -> list[float]:
    """Per-repetition server CPU per op (microseconds)."""
    out = []
    for r in runs:
        if r.broker_cpu_s is None or not r.ops:
            raise BenchUsageError("a repetition without the server's CPU time")
        out.append(1e6 * r.broker_cpu_s / r.ops)
    return out
