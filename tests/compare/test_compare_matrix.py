"""The scenario matrix and the command's argument checks (no QEMU)."""

from __future__ import annotations

import pytest

from testbed.cli import main
from testbed.compare.scenarios import Scenario, build_matrix, scenario, select


def test_matrix_covers_the_issue() -> None:
    m = build_matrix()
    assert len(m) >= 40
    assert {s.attach for s in m} == {"drive", "drive-device", "blockdev", "hotplug"}
    ops = {op for s in m for op in s.operations}
    assert {
        "read",
        "snapshot-qmp",
        "snapshot-hmp",
        "snapshot-existing",
        "add",
        "del",
        "quit",
    } <= ops
    assert any(s.read_only for s in m) and any(s.cache_direct for s in m)
    assert {s.grant for s in m} == {"create", "ro", "main"}
    assert any(s.vvfat_rw for s in m)
    for depth in ("chain1", "chain2", "chain3"):
        assert any(depth in s.image for s in m)


def test_names_are_unique_and_usable_in_paths() -> None:
    names = [s.name for s in build_matrix()]
    assert len(names) == len(set(names))
    assert not any(c in n for n in names for c in "/:, ")


def test_scenario_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="unknown operation 'reed'"):
        scenario("raw", "drive", ("reed",))
    with pytest.raises(ValueError, match="last operation must be 'quit'"):
        Scenario(name="x", image="raw", attach="drive", operations=("read",))
    with pytest.raises(ValueError, match="'add' goes with attach=hotplug"):
        Scenario(name="x", image="raw", attach="drive", operations=("add", "quit"))
    assert "refusal" in scenario("raw", "hotplug", grant="ro").tags


def test_select_by_glob() -> None:
    m = build_matrix()
    assert {s.image for s in select(m, ["vvfat-*"])} == {"vvfat-floppy", "vvfat-fat16"}
    with pytest.raises(ValueError, match="no scenario matches nothing"):
        select(m, ["nothing"])


def test_command_list_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--list", "--scenario", "raw_*"]) == 0
    assert "raw_drive_read" in capsys.readouterr().out
    assert main(["compare", "--scenario", "nothing"]) == 2
    assert main(["compare", "--oracles", "model,oracle9", "--scenario", "raw_*"]) == 2
    assert "unknown oracle(s) oracle9" in capsys.readouterr().err
