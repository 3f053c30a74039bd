"""A saved run read back (``testbed bench --from-json``) renders as the run itself did."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from testbed.bench.plan import QUICK
from testbed.bench.report import markdown, write_json
from testbed.bench.saved import load
from testbed.cli import main
from testbed.errors import BenchUsageError
from tests.bench.test_bench_results import fake_report


def test_a_saved_run_renders_the_same_markdown_and_json(tmp_path: Path) -> None:
    report = fake_report()
    report.machine.update(load_average_at_start=[0.5, 0.4, 0.3], load_average_at_end=[1, 1, 1])
    saved = tmp_path / "run.json"
    write_json(report, saved)
    back = load(saved)
    assert markdown(back) == markdown(report)
    assert back.plan == report.plan
    again = tmp_path / "again.json"
    write_json(back, again)
    assert json.loads(again.read_text()) == json.loads(saved.read_text())


def test_a_goal_is_judged_again_from_the_recorded_median(tmp_path: Path) -> None:
    saved = tmp_path / "run.json"
    write_json(fake_report(), saved)
    data = json.loads(saved.read_text())
    data["ratios"]["broker_64_vs_broker_1"].update(median=0.5, met=True)  # a stale verdict
    saved.write_text(json.dumps(data))
    (v,) = [v for v in load(saved).verdicts if v.key == "broker_64_vs_broker_1"]
    assert v.met is False


def test_plan_fields_unknown_here_are_dropped_and_new_ones_defaulted(tmp_path: Path) -> None:
    saved = tmp_path / "run.json"
    write_json(fake_report(), saved)
    data = json.loads(saved.read_text())
    data["plan"]["from_a_later_version"] = 3
    del data["plan"]["blockdev_cpu_ops"]
    saved.write_text(json.dumps(data))
    plan = load(saved).plan
    assert plan == dataclasses.replace(QUICK, blockdev_cpu_ops=50)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read it"),
        ("{not json", "not JSON"),
        ('{"machine": {}, "plan": {"reps": 1, "seconds": 1, "warmup": 0}}',
         "not a saved bench run: no 'results'"),
        ('{"machine": {}, "plan": {"reps": 1, "seconds": 1, "warmup": 0}, "ratios": {},'
         ' "results": [{"experiment": "x"}]}', "no 'transport'"),
    ],
)  # fmt: skip
def test_a_bad_file_is_named_with_what_is_wrong(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "run.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(BenchUsageError, match=message) as info:
        load(path)
    assert str(path) in str(info.value)


def test_the_command_renders_a_saved_run_without_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "run.json"
    write_json(fake_report(), saved)
    doc = tmp_path / "out.md"
    assert main(["bench", "--from-json", str(saved), "--markdown", str(doc)]) == 0
    assert "| `broker_64_vs_broker_1` | >= 1 | 1.500 | 1.400-1.600 | 3 | yes |" in doc.read_text()
    assert "broker_64_vs_broker_1" in capsys.readouterr().out
    assert main(["bench", "--from-json", str(tmp_path / "none.json")]) == 2
    assert "--from-json" in capsys.readouterr().err
