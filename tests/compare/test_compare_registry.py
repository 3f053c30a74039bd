"""The oracle registry, the status order and the vocabularies the comparison is written in."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import testbed.compare
from testbed.compare import oracles, report
from testbed.compare.attach import AttachMode, attach_args
from testbed.compare.compare import SEVERITY, Status, compare_pair, overall, skipped
from testbed.compare.run import ScenarioResult
from testbed.compare.runners.result import OracleResult
from testbed.compare.scenario_file import _toml
from testbed.compare.scenarios import scenario
from testbed.compare.trace import Open
from testbed.errors import NoSuchPairError, RegistryError, ScenarioDumpError, ScenarioError

PACKAGE = Path(testbed.compare.__file__).parent


def test_status_is_declared_worst_first() -> None:
    assert [str(s) for s in SEVERITY] == ["mismatch", "known-divergence", "match", "skipped"]
    assert Status.worst([Status.MATCH, Status.KNOWN]) is Status.KNOWN
    assert Status.worst([Status.SKIPPED, Status.MATCH]) is Status.MATCH
    assert Status.worst([]) is Status.SKIPPED
    assert overall([skipped("a", "b", "why")]) is Status.SKIPPED


@pytest.mark.parametrize("module", ["report.py", "run.py", "versions.py", "command.py"])
def test_no_oracle_is_named_outside_the_registry(module: str) -> None:
    names = set(oracles.ORACLES)
    tree = ast.parse((PACKAGE / module).read_text())
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
    }
    literals = [
        (n.lineno, n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and n.value in names and id(n) not in docstrings
    ]
    assert literals == []


def test_every_pair_and_known_divergence_names_registered_oracles() -> None:
    names = set(oracles.ORACLES)
    assert all(set(p.names) <= names for p in oracles.PAIRS)
    assert oracles.reference().name in names


def test_a_pair_naming_an_unknown_oracle_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oracles, "PAIRS", (*oracles.PAIRS, oracles.Pair(left="model", right="x")))
    with pytest.raises(RegistryError, match="not in ORACLES"):
        oracles._check()


def _result(sc_oracles: dict[str, OracleResult]) -> ScenarioResult:
    trace = [Open(path="disk.raw", flags=("O_RDONLY",))]
    res = ScenarioResult(scenario=scenario("raw", "drive"), image=None, oracles=sc_oracles)
    for pair in oracles.PAIRS:
        a, b = sc_oracles.get(pair.left), sc_oracles.get(pair.right)
        if a is None or b is None:
            res.pairs.append(skipped(pair.left, pair.right, "not run"))
        else:
            res.pairs.append(compare_pair(pair.left, trace, pair.right, trace))
    return res


def test_a_registered_oracle_reaches_the_report(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # the recipe of docs/architecture.md: one entry, nothing in the report changes
    extra = oracles.Oracle(name="echo", run=oracles.ORACLES["model"].run, title="echo QEMU")
    monkeypatch.setitem(oracles.ORACLES, "echo", extra)
    ran = OracleResult(
        trace=[Open(path="disk.raw", flags=("O_RDONLY",))], operations=[("read", "ok")]
    )
    res = _result({"model": ran, "echo": ran})
    assert "echo QEMU" in report._title()
    report.write_markdown(tmp_path / "r.md", [res], {})
    assert "- echo: read ok" in (tmp_path / "r.md").read_text()


def test_an_outcome_oracle_gets_works_and_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    fd = oracles.ORACLES["fdset"]
    monkeypatch.setitem(oracles.ORACLES, "fdset2", dataclasses.replace(fd, name="fdset2"))
    failed = OracleResult(operations=[("launch", "boom")])
    res = _result({"fdset": OracleResult(operations=[("launch", "ok")]), "fdset2": failed})
    s = report.summary([res])
    assert (s["fdset_works"], s["fdset_fails"], s["fdset2_works"], s["fdset2_fails"]) == (
        1,
        0,
        0,
        1,
    )
    data = res.to_json()
    assert data["fdset_ok"] is True and data["fdset2_ok"] is False
    assert data["fdset2_error"] == "launch: boom"


def test_a_pair_not_compared_is_a_clear_error() -> None:
    res = _result({})
    with pytest.raises(NoSuchPairError, match="no comparison of stock with model"):
        res.pair("stock", "model")


def test_attachments_are_a_vocabulary() -> None:
    assert attach_args(AttachMode.DRIVE) == attach_args("drive")
    with pytest.raises(ScenarioError, match="unknown attachment 'floppy'"):
        attach_args("floppy")
    with pytest.raises(ScenarioError, match="unknown attachment"):
        scenario("raw", "floppy")


def test_a_value_toml_cannot_write_is_a_clear_error() -> None:
    with pytest.raises(ScenarioDumpError, match="as TOML"):
        _toml(object())
    with pytest.raises(TypeError):  # what callers caught before
        _toml(None)
