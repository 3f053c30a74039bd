"""Reading check's TAP, the JSON file, and the report's hooked-only failures."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from testbed.errors import IotestsError
from testbed.iotests.report import divergent, render
from testbed.iotests.results import Refusal, Status, TestRun, read_json, summarise, write_json
from testbed.iotests.runner import parse_tap

TAP = """\
# QEMU          -- "/x/qemu-system-x86_64" -nodefaults
1..1
# running qcow2 051
not ok qcow2 051
ok qcow2 052
ok raw 053 # SKIP
ok qcow2 mirror-top-perms
"""


def test_parse_tap() -> None:
    assert parse_tap(TAP, "qcow2", "051") is Status.FAIL
    assert parse_tap(TAP, "qcow2", "052") is Status.PASS
    assert parse_tap(TAP, "raw", "053") is Status.NOT_RUN
    assert parse_tap(TAP, "qcow2", "mirror-top-perms") is Status.PASS
    assert parse_tap(TAP, "raw", "052") is None  # another format's line is not ours
    assert parse_tap("", "qcow2", "051") is None


def run(mode: str, test: str, status: Status, **kw: object) -> TestRun:
    return TestRun(
        version="7.2", mode=mode, format="qcow2", test=test, status=status, seconds=1.0, **kw
    )  # type: ignore[arg-type]


RUNS = [
    run("unhooked", "051", Status.PASS, launches=3),
    run(
        "hooked",
        "051",
        Status.FAIL,
        reason="output mismatch",
        diff=("-No such file or directory", "+Permission denied"),
        launches=3,
        requests=7,
        refusals=(Refusal("foo:bar", ("O_RDONLY",), -13, "relative path"),),
        first_answer_s=(0.3, 0.1, 0.2),
        latency_us=(10.0, 30.0),
    ),
    run("unhooked", "153", Status.FAIL, reason="flaky lock"),
    run("hooked", "153", Status.FAIL, reason="output mismatch", diff=("+other",)),
    run("unhooked", "030", Status.PASS),
    run("hooked", "030", Status.PASS, requests=5),
]


def test_divergent_is_unhooked_pass_and_hooked_fail_only() -> None:
    pairs = divergent(RUNS, "hooked")
    assert [(u.test, h.test) for u, h in pairs] == [("051", "051")]


def test_summary_counts_and_medians() -> None:
    by_mode = {s.mode: s for s in summarise(RUNS)}
    h = by_mode["hooked"]
    assert h.counts == {"pass": 1, "fail": 2, "not run": 0}
    assert (h.requests, h.refusals, h.launches) == (12, 1, 3)
    assert h.first_answer_median_s == pytest.approx(0.2)
    assert h.latency_median_us == pytest.approx(20.0)
    assert by_mode["unhooked"].first_answer_median_s is None


def test_report_shows_the_diff_of_hooked_only_failures() -> None:
    md = render(RUNS, {"started": "now"}, [])
    assert "## hooked-only failures (1; 0 explained by known divergences)" in md
    assert "+Permission denied" in md and "`foo:bar` O_RDONLY -> -13: relative path" in md
    assert "+other" not in md  # 153 failed unhooked too: not the hook's doing


def test_json_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_json(path, RUNS, {"k": "v"})
    doc = json.loads(path.read_text())
    first = doc["results"][0]
    assert {"version", "mode", "format", "test", "status"} <= set(first)
    assert {r["status"] for r in doc["results"]} <= {"pass", "fail", "not run"}
    back, meta = read_json(path)
    assert back == RUNS and meta == {"k": "v"}


def test_read_json_names_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"results": [{"version": "7.2"}]}')
    with pytest.raises(IotestsError, match=r"bad\.json"):
        read_json(path)


def test_known_divergence_explains_only_a_diff_made_of_it() -> None:
    from testbed.iotests.divergences import KnownDivergence, explain

    k = KnownDivergence("051", r"x: No such file or directory", r"x: Permission denied", "why")
    only = (
        "--- a",
        "+++ b",
        "@@ -1 +1 @@",
        " ctx",
        "-x: No such file or directory",
        "+x: Permission denied",
    )
    assert explain("051", only, [k]) == [k]
    assert explain("052", only, [k]) is None  # another test's divergence does not count
    more = (*only, "+y: Permission denied")  # one more changed line: a defect could hide there
    assert explain("051", more, [k]) is None
    assert explain("051", ("-x: No such file or directory",), [k]) == [k]
    assert explain("051", (), [k]) is None


def test_cost_per_launch_uses_tests_that_passed_both_ways() -> None:
    from testbed.iotests.report import cost_per_launch

    runs = [
        run("unhooked", "a", Status.PASS, launches=10),
        run("hooked", "a", Status.PASS, launches=10),
        run("unhooked", "b", Status.PASS, launches=4),
        run("hooked", "b", Status.FAIL, launches=4),  # not counted: failed hooked
    ]
    runs[1] = dataclasses.replace(runs[1], seconds=3.0)  # 2 s more over 10 launches
    assert cost_per_launch(runs, "hooked") == pytest.approx(0.2)
    assert cost_per_launch(runs[2:], "hooked") is None


def test_same_failure_compares_the_diff_without_its_file_names() -> None:
    from testbed.iotests.report import same_failure

    u = run("unhooked", "153", Status.FAIL, diff=("--- a", "+++ u", "-x", "+y runs/unhooked/1"))
    h = run("hooked", "153", Status.FAIL, diff=("--- a", "+++ h", "-x", "+y runs/hooked/1"))
    other = run("hooked", "153", Status.FAIL, diff=("--- a", "+++ h", "-x", "+z"))
    assert same_failure(u, h)
    assert not same_failure(u, other)
    assert not same_failure(u, run("hooked", "153", Status.PASS))
