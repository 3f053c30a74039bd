"""Ratios, goals, the JSON shape, the table and the plots, on made-up figures."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from testbed.bench.placement import Placement
from testbed.bench.report import print_report, write_json, write_plots
from testbed.bench.results import Result, goals, ratios, skipped
from testbed.bench.runner import QUICK, Report


def row(transport: str, clients: int, placement: str, rate: float, **kw: float) -> Result:
    return Result(
        transport=transport, clients=clients, placement=placement, ops_per_s=rate,
        ops_per_s_min=rate * 0.9, ops_per_s_max=rate * 1.1, noise_pct=20.0,
        p50_us=kw.get("p50", 10.0), p95_us=20.0, p99_us=kw.get("p99", 30.0), reps=3,
        add_p50_us=kw.get("add"),
    )  # fmt: skip


RESULTS = [
    row("c_limit", 1, "same-core", 40000),
    row("broker", 1, "same-core", 30000),
    row("c_limit", 1, "cross-core", 10000),
    row("broker", 1, "cross-core", 5000),
    row("c_limit", 1, "unpinned", 20000),
    row("broker", 1, "unpinned", 20000),
    row("broker", 8, "unpinned", 21000),
    row("broker", 64, "unpinned", 19000, p99=2500),
    row("qmp_add_fd", 1, "unpinned", 800),
    row("blockdev_add_path", 1, "unpinned", 500, add=1000),
    row("blockdev_add_fdset", 1, "unpinned", 500, add=900),
    skipped("blockdev_add_hook", 1, "unpinned", "patched QEMU not built"),
]


def test_ratios_compare_like_with_like() -> None:
    r = ratios(RESULTS, sweep_placement="unpinned")
    assert r["broker_1_vs_c_limit"] == 0.75
    assert r["broker_1_vs_c_limit_cross_core"] == 0.5
    assert r["broker_64_vs_broker_1"] == 0.95
    assert r["hook_vs_qmp_addfd"] == 25
    assert r["qemu_hook_vs_path"] is None  # skipped, not zero
    assert r["qemu_fdset_vs_path"] == 0.9


def test_goals_say_met_failed_or_not_measured() -> None:
    r = ratios(RESULTS, sweep_placement="unpinned")
    met = {g.name: g.met for g in goals(RESULTS, r, sweep_placement="unpinned")}
    assert met == {
        "broker_1_vs_c_limit": True,
        "broker_1_vs_c_limit_cross_core": False,
        "broker_64_vs_broker_1": True,
        "broker_64_p99_us": False,
        "hook_vs_qmp_addfd": True,
        "qemu_hook_vs_path": None,
    }


def make_report() -> Report:
    r = ratios(RESULTS, sweep_placement="unpinned")
    return Report(
        machine={"cpu_model": "Test CPU", "nproc": 2, "kernel": "6.1", "python": "3.11"},
        plan=QUICK,
        results=list(RESULTS),
        ratios=r,
        goals=goals(RESULTS, r, sweep_placement=Placement.UNPINNED.value),
    )


def test_json_has_the_keys_the_issue_names(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "bench.json"
    write_json(make_report(), out)
    data = json.loads(out.read_text())
    assert {"results", "ratios", "machine", "goals", "plan"} <= data.keys()
    for key in ("cpu_model", "nproc", "kernel", "python"):
        assert key in data["machine"]
    for key in (
        "broker_1_vs_c_limit", "broker_1_vs_c_limit_cross_core", "broker_64_vs_broker_1",
        "hook_vs_qmp_addfd", "qemu_hook_vs_path",
    ):  # fmt: skip
        assert key in data["ratios"]
    measured = [r for r in data["results"] if "skipped" not in r]
    for r in measured:
        for key in ("transport", "clients", "ops_per_s", "p50_us", "p95_us", "p99_us"):
            assert key in r
    hook = [r for r in data["results"] if r["transport"] == "blockdev_add_hook"]
    assert hook == [
        {"transport": "blockdev_add_hook", "clients": 1, "placement": "unpinned", "reps": 0,
         "skipped": "patched QEMU not built"}
    ]  # fmt: skip


def test_table_names_the_machine_and_the_skip() -> None:
    console = Console(width=200, record=True)
    print_report(make_report(), console)
    text = console.export_text()
    assert "Test CPU" in text
    assert "skipped: patched QEMU not built" in text
    assert "not measured" in text


def test_plots_are_png_files(tmp_path: Path) -> None:
    paths = write_plots(make_report(), tmp_path / "plots")
    assert [p.name for p in paths] == ["throughput.png", "latency.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
