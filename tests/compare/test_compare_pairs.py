"""The comparator on crafted traces: matches, mismatches, known divergences."""

from __future__ import annotations

from testbed.compare.compare import Status, compare_pair, overall, skipped
from testbed.compare.trace import Open


def op(path: str, *flags: str, result: str = "ok") -> Open:
    return Open(
        path=path,
        flags=flags or ("O_RDONLY",),
        result=result,
        probe="O_NONBLOCK" in flags and "O_DIRECTORY" not in flags,
    )


BASE = [op("top.qcow2", "O_RDONLY", "O_NONBLOCK"), op("top.qcow2"), op("base.raw")]


def test_equal_traces_match() -> None:
    r = compare_pair("model", BASE, "patched", list(BASE))
    assert r.status == Status.MATCH and r.diff == ()


def test_order_matters() -> None:
    r = compare_pair("model", BASE, "patched", [BASE[0], BASE[2], BASE[1]])
    assert r.status == Status.MISMATCH
    assert any(
        line.startswith("-open base.raw") or line.startswith("+open base.raw") for line in r.diff
    )


def test_flags_matter() -> None:
    r = compare_pair("model", BASE, "patched", [*BASE[:2], op("base.raw", "O_RDWR")])
    assert r.status == Status.MISMATCH


def test_a_directory_scan_only_in_stock_is_a_mismatch() -> None:
    # Patch 0008 sends vvfat's directory opens through the hook: a scan the
    # hook did not see is no longer excused.
    stock = [op("tree", "O_RDONLY", "O_NONBLOCK", "O_DIRECTORY"), *BASE]
    r = compare_pair("patched", BASE, "stock", stock)
    assert r.status == Status.MISMATCH and r.diff


def test_the_same_directory_scan_on_both_sides_matches() -> None:
    scan = [op("tree", "O_RDONLY", "O_NONBLOCK", "O_DIRECTORY"), *BASE]
    assert compare_pair("patched", scan, "stock", scan).status == Status.MATCH


def test_refusal_compares_up_to_the_refused_open() -> None:
    patched = [*BASE[:2], op("base.raw", result="EACCES")]
    stock = [*BASE, op("base.raw", "O_RDWR")]
    tagged = compare_pair("patched", patched, "stock", stock, tags=frozenset({"refusal"}))
    assert tagged.status == Status.KNOWN and tagged.divergences == ("refusal",)
    untagged = compare_pair("patched", patched, "stock", stock)
    assert untagged.status == Status.MISMATCH


def test_refusal_still_catches_a_difference_before_the_refusal() -> None:
    patched = [BASE[1], op("base.raw", result="EACCES")]
    stock = [BASE[0], BASE[1], op("base.raw")]
    r = compare_pair("patched", patched, "stock", stock, tags=frozenset({"refusal"}))
    assert r.status == Status.MISMATCH


def test_overall_is_the_worst() -> None:
    m = compare_pair("a", BASE, "b", BASE)
    k = compare_pair(
        "patched",
        [*BASE[:2], op("base.raw", result="EACCES")],
        "stock",
        [*BASE, op("base.raw", "O_RDWR")],
        tags=frozenset({"refusal"}),
    )
    x = compare_pair("a", BASE, "b", [])
    s = skipped("model", "patched", "no model")
    assert overall([m, s]) == Status.MATCH
    assert overall([m, k, s]) == Status.KNOWN
    assert overall([m, k, x]) == Status.MISMATCH
    assert overall([s]) == Status.SKIPPED


def test_same_opens_but_an_operation_failing_on_one_side_is_a_mismatch() -> None:
    from testbed.compare.run import _check_outcomes
    from testbed.compare.runners.result import OracleResult
    from testbed.compare.scenarios import scenario

    sc = scenario("raw", "drive")
    a = OracleResult(trace=list(BASE), operations=[("launch", "ok"), ("read", "ok")])
    b = OracleResult(trace=list(BASE), operations=[("launch", "ok"), ("read", "I/O error")])
    pair = compare_pair("patched", a.trace, "stock", b.trace)
    checked = _check_outcomes(pair, a, b, sc)
    assert checked.status == Status.MISMATCH
    assert "+read failed" in checked.diff
    same = OracleResult(trace=list(BASE), operations=[("launch", "ok"), ("read", "ok")])
    assert _check_outcomes(pair, a, same, sc).status == Status.MATCH
    # a refusal scenario is expected to fail on the refusing side
    assert (
        _check_outcomes(pair, a, b, scenario("raw", "hotplug", grant="ro")).status == Status.MATCH
    )


def test_relative_name_refused_by_the_broker_is_known_but_only_for_that_open() -> None:
    patched = [op("cwd:fat:$D/tree", "O_RDONLY", "O_NONBLOCK", result="EACCES"), *BASE]
    stock = [op("cwd:fat:$D/tree", "O_RDONLY", "O_NONBLOCK", result="ENOENT"), *BASE]
    r = compare_pair("patched", patched, "stock", stock)
    assert r.status == Status.KNOWN and r.divergences == ("relative-name",)
    absolute = [op("tree", "O_RDONLY", "O_NONBLOCK", result="EACCES"), *BASE]
    stock_abs = [op("tree", "O_RDONLY", "O_NONBLOCK", result="ENOENT"), *BASE]
    assert compare_pair("patched", absolute, "stock", stock_abs).status == Status.MISMATCH
