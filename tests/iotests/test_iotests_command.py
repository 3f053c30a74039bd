"""``testbed iotests`` on bad input: a clear message and exit status 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.cli import main
from testbed.iotests.results import Status, TestRun, read_json, write_json


def test_unknown_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["iotests", "--mode", "hooked,sideways"]) == 2
    err = capsys.readouterr().err
    assert "'sideways'" in err and "unhooked, hooked, supervised" in err


def test_unknown_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["iotests", "--qemu-version", "9.9"]) == 2
    assert "no build of QEMU 9.9" in capsys.readouterr().err


def test_not_a_build_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["iotests", "--qemu-build", str(tmp_path)]) == 2
    assert f"{tmp_path}: no patched QEMU build" in capsys.readouterr().err


def test_from_json_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "r.json"
    bad.write_text("not json")
    assert main(["iotests", "--from-json", str(bad)]) == 2
    assert f"{bad}: not an iotests result file" in capsys.readouterr().err


def test_from_json_merges_and_reports(tmp_path: Path) -> None:
    def run(version: str, mode: str, status: Status) -> TestRun:
        return TestRun(
            version=version, mode=mode, format="qcow2", test="051", status=status, seconds=1.0
        )

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_json(a, [run("7.2", "unhooked", Status.PASS), run("7.2", "hooked", Status.PASS)], {})
    write_json(b, [run("10.0", "unhooked", Status.PASS), run("10.0", "hooked", Status.FAIL)], {})
    out = tmp_path / "report"
    assert (
        main(["iotests", "--from-json", str(a), "--from-json", str(b), "--report", str(out)]) == 1
    )
    md = (out / "iotests.md").read_text()
    assert "| 051 | qcow2 | pass | pass | pass | **FAIL** |" in md


def test_from_json_a_later_rerun_replaces_the_earlier_result(tmp_path: Path) -> None:
    def run(mode: str, status: Status) -> TestRun:
        return TestRun(
            version="7.2", mode=mode, format="vvfat", test="vvfat", status=status, seconds=1.0
        )

    full, again = tmp_path / "full.json", tmp_path / "again.json"
    write_json(full, [run("unhooked", Status.PASS), run("hooked", Status.FAIL)], {})
    write_json(again, [run("hooked", Status.PASS)], {})
    merged = tmp_path / "merged.json"
    argv = ["iotests", "--from-json", str(full), "--from-json", str(again), "--json", str(merged)]
    assert main([*argv, "--report", str(tmp_path / "report")]) == 0  # no hooked-only failure
    runs, _ = read_json(merged)
    assert [(r.mode, r.status) for r in runs] == [
        ("unhooked", Status.PASS),
        ("hooked", Status.PASS),
    ]
