"""The scenario matrix, the operation registry and the command's argument checks (no QEMU)."""

from __future__ import annotations

import pytest

from testbed.cli import main
from testbed.compare.ops import Op, all_operations
from testbed.compare.scenarios import Scenario, build_matrix, scenario, select
from testbed.compare.steps import QUIT, StepKind, qmp


def test_matrix_covers_the_issues() -> None:
    m = build_matrix()
    assert len(m) >= 120
    assert {s.attach for s in m} == {
        "drive", "drive-device", "blockdev", "hotplug", "node-refs", "file-node", "json",
        "snapshot-on", "snapshot", "cdrom",
    }  # fmt: skip
    # every registered operation but the bookkeeping ones is exercised by some scenario
    exercised = {s.operation for s in m}
    for op in Op:
        if op not in (Op.ADD, Op.DEL, Op.QUIT, Op.READ):
            assert op.value in exercised, op
    commands = {st.command for s in m for st in s.steps if st.kind is StepKind.QMP}
    assert {
        "block-commit", "block-stream", "drive-mirror", "blockdev-mirror", "drive-backup",
        "blockdev-backup", "blockdev-reopen", "blockdev-change-medium", "eject",
        "blockdev-open-tray", "blockdev-close-tray", "block-job-complete", "block-job-cancel",
        "blockdev-snapshot-sync", "blockdev-add", "blockdev-del",
    } <= commands  # fmt: skip
    assert {s.grant for s in m} == {"create", "ro", "main"}
    for depth in ("chain1", "chain2", "chain3"):
        assert any(depth in s.image for s in m)
    # every job start is followed by a wait for it, by its job id
    for s in m:
        for i, st in enumerate(s.steps):
            if st.kind is StepKind.QMP and "job-id" in st.arguments:
                job = st.arguments["job-id"]
                assert any(w.kind is StepKind.WAIT and w.job == job for w in s.steps[i:]), s.name


def test_every_operation_has_a_module_and_steps() -> None:
    ops = all_operations()
    assert set(ops) == set(Op)
    for op in ops.values():
        assert op.summary


def test_names_are_unique_and_usable_in_paths() -> None:
    names = [s.name for s in build_matrix()]
    assert len(names) == len(set(names))
    assert not any(c in n for n in names for c in "/:, ")


def test_scenario_checks_its_fields() -> None:
    with pytest.raises(KeyError, match="unknown operation 'reed'"):
        scenario("raw", "drive", ("reed",))
    with pytest.raises(ValueError, match="last step must be quit"):
        Scenario(name="x", image="raw", steps=(qmp("query-block"),))
    with pytest.raises(ValueError, match="quit may only be the last step"):
        Scenario(name="x", image="raw", steps=(QUIT, QUIT))
    with pytest.raises(ValueError, match="must name its main file"):
        Scenario(name="x", image="", recipe=("true",), steps=(QUIT,))
    with pytest.raises(ValueError, match="does not go with attach drive"):
        scenario("raw", "drive", ("reopen-rw",))
    assert "refusal" in scenario("raw", "hotplug", grant="ro").tags
    assert "tmpdir" in scenario("raw", "snapshot", ()).tags


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
