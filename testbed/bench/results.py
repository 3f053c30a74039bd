"""Benchmark figures, the ratios the issue asks for, and the goals they meet.

A :class:`Result` is one measured (transport, clients, placement) cell, or a
skipped one with the reason.  Ratios compare cells taken under the same CPU
placement in the same run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from testbed.bench.stats import Summary


@dataclass(frozen=True, kw_only=True)
class Result:
    transport: str
    clients: int
    placement: str
    ops_per_s: float | None = None
    ops_per_s_min: float | None = None
    ops_per_s_max: float | None = None
    noise_pct: float | None = None
    p50_us: float | None = None
    p95_us: float | None = None
    p99_us: float | None = None
    broker_cpu_us_per_op: float | None = None
    reps: int = 0
    add_p50_us: float | None = None  # blockdev-add alone, for the blockdev transports
    skipped: str | None = None

    def as_json(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def from_summary(
    transport: str, clients: int, placement: str, summary: Summary,
    *, add_p50_us: float | None = None,
) -> Result:  # fmt: skip
    return Result(
        transport=transport,
        clients=clients,
        placement=placement,
        ops_per_s=summary.ops_per_s,
        ops_per_s_min=summary.ops_per_s_min,
        ops_per_s_max=summary.ops_per_s_max,
        noise_pct=summary.noise_pct,
        p50_us=summary.p50_us,
        p95_us=summary.p95_us,
        p99_us=summary.p99_us,
        broker_cpu_us_per_op=summary.broker_cpu_us_per_op,
        reps=summary.reps,
        add_p50_us=add_p50_us,
    )


def skipped(transport: str, clients: int, placement: str, reason: str) -> Result:
    return Result(transport=transport, clients=clients, placement=placement, skipped=reason)


def find(
    results: Sequence[Result], transport: str, clients: int = 1, placement: str | None = None
) -> Result | None:
    """The measured cell, or ``None`` when absent or skipped."""
    for r in results:
        if (
            r.transport == transport
            and r.clients == clients
            and (placement is None or r.placement == placement)
            and r.skipped is None
        ):
            return r
    return None


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def ratios(results: Sequence[Result], *, sweep_placement: str) -> dict[str, float | None]:
    """The ratios of the issue (``None`` where a side was not measured)."""

    def rate(transport: str, clients: int = 1, placement: str | None = None) -> float | None:
        r = find(results, transport, clients, placement)
        return None if r is None else r.ops_per_s

    def add_p50(transport: str) -> float | None:
        r = find(results, transport)
        return None if r is None else r.add_p50_us

    return {
        "broker_1_vs_c_limit": _div(
            rate("broker", 1, "same-core"), rate("c_limit", 1, "same-core")
        ),
        "broker_1_vs_c_limit_cross_core": _div(
            rate("broker", 1, "cross-core"), rate("c_limit", 1, "cross-core")
        ),
        "broker_1_vs_c_limit_unpinned": _div(
            rate("broker", 1, "unpinned"), rate("c_limit", 1, "unpinned")
        ),
        "broker_64_vs_broker_1": _div(
            rate("broker", 64, sweep_placement), rate("broker", 1, sweep_placement)
        ),
        "hook_vs_qmp_addfd": _div(rate("broker", 1, "unpinned"), rate("qmp_add_fd")),
        "qemu_hook_vs_path": _div(add_p50("blockdev_add_hook"), add_p50("blockdev_add_path")),
        "qemu_fdset_vs_path": _div(add_p50("blockdev_add_fdset"), add_p50("blockdev_add_path")),
    }


@dataclass(frozen=True, kw_only=True)
class Goal:
    name: str
    target: str
    value: float | None
    met: bool | None  # None: not measured in this run

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def goals(
    results: Sequence[Result], ratio: dict[str, float | None], *, sweep_placement: str
) -> list[Goal]:
    """The issue's goals, each with the measured value and whether it holds."""

    def check(name: str, target: str, value: float | None, ok: bool) -> Goal:
        return Goal(name=name, target=target, value=value, met=None if value is None else ok)

    scale = ratio["broker_64_vs_broker_1"]
    top = find(results, "broker", 64, sweep_placement)
    p99 = None if top is None else top.p99_us
    out = []
    for key in ("broker_1_vs_c_limit", "broker_1_vs_c_limit_cross_core"):
        v = ratio[key]
        out.append(check(key, ">= 0.6", v, v is not None and v >= 0.6))
    out.append(check("broker_64_vs_broker_1", ">= 0.9", scale, scale is not None and scale >= 0.9))
    out.append(check("broker_64_p99_us", "< 2000", p99, p99 is not None and p99 < 2000))
    v = ratio["hook_vs_qmp_addfd"]
    out.append(check("hook_vs_qmp_addfd", ">= 20", v, v is not None and v >= 20))
    v = ratio["qemu_hook_vs_path"]
    out.append(check("qemu_hook_vs_path", "<= 1.15", v, v is not None and v <= 1.15))
    return out
