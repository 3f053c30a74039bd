"""The matrix on several QEMU versions: what differs between them, side by side in the report."""

from __future__ import annotations

import json
from pathlib import Path

from testbed.compare.compare import compare_pair
from testbed.compare.run import PAIRS, ScenarioResult
from testbed.compare.runners.result import OracleResult
from testbed.compare.scenarios import scenario
from testbed.compare.trace import Open


def _open(path: str, flags: str = "O_RDONLY") -> Open:
    return Open(path=path, flags=tuple(flags.split("|")))


def _result(version: str, opens: list[Open], *, fdset_error: str = "") -> ScenarioResult:
    sc = scenario("raw", "drive")
    fd = OracleResult(operations=[("launch", "ok"), ("read", fdset_error or "ok")])
    res = ScenarioResult(scenario=sc, image=None, qemu_version=version)
    for name in ("model", "patched", "stock", "seccomp"):
        res.oracles[name] = OracleResult(trace=list(opens), operations=[("launch", "ok")])
    res.oracles["fdset"] = fd
    for left, right in (p.names for p in PAIRS):
        res.pairs.append(compare_pair(left, opens, right, opens, tags=sc.tags))
    return res


def test_equal_runs_differ_in_nothing() -> None:
    from testbed.compare.versions import compared, differences

    runs = [_result("7.2", [_open("disk.raw")]), _result("10.0", [_open("disk.raw")])]
    assert differences(runs) == []
    assert compared(runs) == 1


def test_a_changed_open_is_reported_with_its_diff() -> None:
    from testbed.compare.versions import differences

    runs = [
        _result("7.2", [_open("disk.raw")]),
        _result("10.0", [_open("disk.raw", "O_RDONLY|O_DIRECT")]),
    ]
    (d,) = differences(runs)
    assert (d.scenario, d.base, d.version) == (runs[0].scenario.name, "7.2", "10.0")
    assert set(d.opens) == {"patched", "stock"}
    assert "+open disk.raw O_RDONLY|O_DIRECT -> ok" in d.opens["patched"]
    assert d.outcomes.get("fdset") is None and d.status is None


def test_a_changed_fdset_result_is_reported() -> None:
    from testbed.compare.versions import differences

    runs = [
        _result("7.2", [_open("disk.raw")]),
        _result("10.0", [_open("disk.raw")], fdset_error="Failed to find file descriptor"),
    ]
    (d,) = differences(runs)
    assert d.opens == {}
    assert d.outcomes.get("fdset") == ("works", "fails: read: Failed to find file descriptor")


def test_report_puts_versions_side_by_side(tmp_path: Path) -> None:
    from rich.console import Console

    from testbed.compare import report

    runs = [
        _result("7.2", [_open("disk.raw")]),
        _result("10.0", [_open("disk.raw", "O_RDWR")]),
    ]
    meta = {"binaries": {"7.2": {"patched": "/p72", "stock": "/s72"}, "10.0": {}}}
    report.write_markdown(tmp_path / "r.md", runs, meta)
    report.write_html(tmp_path / "r.html", runs, meta)
    report.write_json(tmp_path / "r.json", runs, meta)
    md = (tmp_path / "r.md").read_text()
    assert "| 7.2 opens |" in md and "| 10.0 opens |" in md
    assert "## Between versions" in md and "+open disk.raw O_RDWR -> ok" in md
    # one row per scenario, not one per run
    assert md.count(f"| {runs[0].scenario.name} |") == 1
    assert "<th colspan=5>QEMU 10.0" in (tmp_path / "r.html").read_text()
    data = json.loads((tmp_path / "r.json").read_text())
    assert [s["qemu_version"] for s in data["scenarios"]] == ["7.2", "10.0"]
    assert set(data["versions"]) == {"7.2", "10.0"}
    assert len(data["version_differences"]["differences"]) == 1
    console = Console(record=True, width=300)
    report.print_summary(console, runs, 1.0)
    text = console.export_text()
    assert "7.2 opens" in text and "10.0 opens" in text
    assert "opens differ in 1" in text
