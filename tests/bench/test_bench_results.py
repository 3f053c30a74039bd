"""Goals, the JSON's shape, the tables and the plots, on made-up figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from testbed.bench.goals import GOALS, KEYS, judge
from testbed.bench.plan import QUICK
from testbed.bench.report import print_report, write_json, write_plots
from testbed.bench.results import Outcome, Row
from testbed.bench.runner import Report
from testbed.bench.stats import spread

#: The keys of the goals table in issue 16, as the issue spells them.
ISSUE_KEYS = {
    "broker_cpu_vs_python_floor": ("<=", 1.25),
    "qemu_hook_vs_path": ("<=", 1.15),
    "qemu_hook_c_vs_path": ("<=", 1.10),
    "startup_depth64_hook_vs_path": ("<=", 1.20),
    "storm16_hook_vs_path": ("<=", 1.30),
    "hook_vs_qmp_addfd": (">=", 15),
    "broker_64_vs_broker_1": (">=", 1.0),
    "broker_64_p99_vs_littles_mean": ("<=", 2.0),
}


#: The ratios without a goal that issue 13 (the seccomp supervisor) asks for.
SECCOMP_KEYS = (
    "seccomp_open_vs_plain",
    "seccomp_open_vs_hook_c",
    "seccomp_open_vs_hook",
    "startup_supervised_vs_plain",
    "startup_landlock_vs_plain",
)
#: The Python floor inside QEMU's open path (issue 16's "why" for qemu_hook_vs_path).
FLOOR_KEYS = (
    "qemu_hook_vs_path_unpinned",
    "qemu_hook_c_vs_path_unpinned",
    "qemu_hook_floor_vs_path",
    "qemu_hook_vs_hook_floor",
    "qemu_hook_added_vs_broker_cpu",
)


def test_the_goals_are_the_issues_table() -> None:
    assert {g.key: (g.op.value, g.target) for g in GOALS} == ISSUE_KEYS


def test_a_ratio_is_the_median_of_per_repetition_ratios_with_its_range() -> None:
    (v,) = [x for x in judge({"qemu_hook_vs_path": [1.3, 1.0, 1.1, 5.0, 1.05]}) if x.value]
    assert v.value is not None
    assert (v.value.median, v.value.low, v.value.high, v.value.n) == (1.1, 1.0, 5.0, 5)
    assert v.met is True  # the median, not the mean (1.89), decides


@pytest.mark.parametrize(
    ("key", "value", "met"),
    [
        ("broker_cpu_vs_python_floor", 1.25, True),
        ("broker_cpu_vs_python_floor", 1.2501, False),
        ("hook_vs_qmp_addfd", 15.0, True),
        ("hook_vs_qmp_addfd", 14.99, False),
    ],
)
def test_goal_boundaries(key: str, value: float, met: bool) -> None:
    (v,) = [x for x in judge({key: [value]}) if x.key == key]
    assert v.met is met


def test_an_unmeasured_ratio_is_not_a_failure_and_says_why() -> None:
    verdicts = judge({}, {"storm16_hook_vs_path": "patched QEMU not built"})
    storm = next(v for v in verdicts if v.key == "storm16_hook_vs_path")
    assert storm.met is None and storm.reason == "patched QEMU not built"
    assert all(v.met is None for v in verdicts)


def test_a_ratio_outside_the_table_is_refused() -> None:
    with pytest.raises(KeyError, match="qemu_fdset_vs_path"):
        judge({"qemu_fdset_vs_path": [0.9]})
    with pytest.raises(KeyError, match=r"nonsense@10\.0"):
        judge({}, {"nonsense@10.0": "no"})


def test_versioned_ratios_follow_their_key_and_are_judged_alike() -> None:
    verdicts = judge(
        {"qemu_hook_vs_path": [1.1], "qemu_hook_vs_path@10.0": [1.3]},
        {"hook_vs_qmp_addfd@10.0": "stock QEMU 10.0 not built"},
    )
    keys = [v.key for v in verdicts]
    i = keys.index("qemu_hook_vs_path")
    assert keys[i + 1] == "qemu_hook_vs_path@10.0"
    assert [v.met for v in verdicts[i : i + 2]] == [True, False]  # both against <= 1.15
    addfd = verdicts[keys.index("hook_vs_qmp_addfd@10.0")]
    assert addfd.met is None and addfd.reason == "stock QEMU 10.0 not built"
    assert len(verdicts) == len(KEYS) + 2


def test_an_information_ratio_has_no_goal_and_is_never_met_or_failed() -> None:
    (v,) = [x for x in judge({"seccomp_open_vs_plain": [120.0, 150.0]}) if x.value]
    assert (v.key, v.text, v.met, v.value and v.value.median) == (
        "seccomp_open_vs_plain", "information", None, 135.0,
    )  # fmt: skip
    assert v.to_json()["goal"] == "information" and v.to_json()["met"] is None


def fake_report() -> Report:
    s = spread([10.0, 12.0, 11.0])
    rows = [
        Row(experiment="pingpong", transport="broker", setting="same-core",
            figures={"ops_per_s": spread([2e4, 2.1e4]), "p50_us": s, "p99_us": s,
                     "server_cpu_us_per_op": s}),
        Row(experiment="sweep", transport="broker", setting="1 clients unpinned",
            figures={"ops_per_s": spread([2e4]), "p50_us": s, "p99_us": s}),
        Row(experiment="sweep", transport="broker", setting="64 clients unpinned",
            figures={"ops_per_s": spread([3e4]), "p50_us": s, "p99_us": s}),
        Row(experiment="startup", transport="path", setting="depth 1, same-core",
            figures={"ms": s}),
        Row(experiment="startup", transport="path", setting="depth 64, same-core",
            figures={"ms": s}),
        Row(experiment="startup", transport="hook_c", setting="depth 1",
            skipped="open-hook-server not built"),
        Row(experiment="blockdev", transport="path", setting="blockdev-add p50, unpinned",
            figures={"ms": s}, qemu_version="10.0"),
    ]  # fmt: skip
    outcome = Outcome(rows=rows, ratios={"broker_64_vs_broker_1": [1.5, 1.4, 1.6]})
    outcome.extra["startup_ms_per_layer"] = {"path": spread([0.5, 0.6]).to_json()}
    report = Report(machine={"cpu_model": "test"}, plan=QUICK, outcome=outcome)
    report.verdicts = judge(outcome.ratios, {"qemu_hook_vs_path": "not built"})
    return report


def test_json_ratios_use_exactly_the_issues_keys(tmp_path: Path) -> None:
    path = tmp_path / "out" / "bench.json"
    write_json(fake_report(), path)
    data = json.loads(path.read_text())
    assert list(data["ratios"]) == list(KEYS) == [
        *ISSUE_KEYS, *SECCOMP_KEYS, *FLOOR_KEYS, "broker_64_p99_vs_littles_mean_unpinned",
        "blockdev_add_supervised_vs_path",
    ]  # fmt: skip
    scale = data["ratios"]["broker_64_vs_broker_1"]
    assert (scale["median"], scale["min"], scale["max"], scale["reps"]) == (1.5, 1.4, 1.6, 3)
    assert scale["met"] is True and scale["goal"] == ">= 1"
    assert data["ratios"]["qemu_hook_vs_path"]["met"] is None
    assert data["ratios"]["qemu_hook_vs_path"]["not_measured"] == "not built"
    skipped = [r for r in data["results"] if "skipped" in r]
    assert skipped == [{"experiment": "startup", "transport": "hook_c", "setting": "depth 1",
                        "skipped": "open-hook-server not built"}]  # fmt: skip
    (blockdev,) = [r for r in data["results"] if r["experiment"] == "blockdev"]
    assert blockdev["qemu_version"] == "10.0" and blockdev["figures"]["ms"]["median"] == 11.0


def test_the_report_prints_goal_value_spread_and_verdict() -> None:
    console = Console(record=True, width=200)
    print_report(fake_report(), console)
    text = console.export_text()
    line = next(x for x in text.splitlines() if "broker_64_vs_broker_1" in x)
    for word in (">= 1", "1.500", "1.400-1.600", "3", "yes"):
        assert word in line
    assert "not measured: not built" in text
    assert "skipped: open-hook-server not built" in text


def test_plots_are_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    paths = write_plots(fake_report(), tmp_path)
    assert {p.name for p in paths} == {"startup.png", "throughput.png", "latency.png"}
    assert all(p.stat().st_size > 1000 for p in paths)


def test_markdown_replaces_only_the_results_section(tmp_path: Path) -> None:
    from testbed.bench.report import BEGIN, END, write_markdown

    doc = tmp_path / "bench.md"
    doc.write_text(f"# Benchmark\nintro\n{BEGIN}\nold figures\n{END}\nclosing words\n")
    write_markdown(fake_report(), doc)
    text = doc.read_text()
    assert text.startswith("# Benchmark\nintro\n") and text.endswith(f"{END}\nclosing words\n")
    assert "old figures" not in text
    assert "| `broker_64_vs_broker_1` | >= 1 | 1.500 | 1.400-1.600 | 3 | yes |" in text
    assert "| hook_c | depth 1 | skipped: open-hook-server not built |" in text
    # a QEMU column only where the rows have versions
    assert "| transport | QEMU | setting | ms |" in text
    assert "| path | 10.0 | blockdev-add p50, unpinned | 11.00 (10.00-12.00) |" in text
    assert text.count(BEGIN) == 1


def test_markdown_in_a_file_with_the_ratios_markers_replaces_only_the_ratios(
    tmp_path: Path,
) -> None:
    from testbed.bench.report import RATIOS_BEGIN, RATIOS_END, write_markdown

    readme = tmp_path / "README.md"
    readme.write_text(f"# Testbed\n{RATIOS_BEGIN}\nold\n{RATIOS_END}\nmore\n")
    write_markdown(fake_report(), readme)
    text = readme.read_text()
    assert text.startswith("# Testbed\n") and text.endswith(f"{RATIOS_END}\nmore\n")
    assert "old" not in text and "QEMU 7.2;" in text
    assert "| `broker_64_vs_broker_1` | >= 1 | 1.500 | 1.400-1.600 | 3 | yes |" in text
    assert "| `seccomp_open_vs_plain` | information | - | - | - | not measured" in text
    assert "**pingpong**" not in text  # the ratios only
