# ruff: noqa: E501 - the malformed-file table reads best one case per line
"""Scenario files: the built-in matrix round-trips, malformed files name file, line and key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from testbed.cli import main
from testbed.compare.scenario_file import dump, dump_matrix, load
from testbed.compare.scenarios import Grant, build_matrix
from testbed.compare.steps import StepKind
from testbed.errors import ScenarioFileError

GOOD = """\
[[scenario]]
name = "my-commit"
image = "qcow2-chain2-subdir"
machine = "pc"
args = ["-S", "-drive", "file=$IMAGE,format=$FORMAT,if=none,id=drive0",
        "-device", "virtio-blk-pci,drive=drive0"]
operation = "commit"

[[scenario.steps]]
qmp = "block-commit"
arguments = { device = "drive0", "job-id" = "job0", top = "$D/top/../mid/mid.qcow2" }

[[scenario.steps]]
wait = "BLOCK_JOB_COMPLETED"
job = "job0"
timeout = 30

[[scenario]]
name = "recipe-only"
recipe = ["qemu-img create -q -f raw disk.raw 1M"]
main = "disk.raw"
format = "raw"
args = ["-blockdev", "driver=raw,node-name=drive0,file.driver=file,file.filename=$IMAGE"]

[[scenario.steps]]
read = { offset = 0, length = 4096 }

[[scenario.steps]]
op = "snapshot-qmp"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


def test_a_file_gives_scenarios(tmp_path: Path) -> None:
    first, second = load(_write(tmp_path, GOOD))
    assert first.name == "my-commit" and first.machine == "pc" and first.operation == "commit"
    assert [s.kind for s in first.steps] == [StepKind.QMP, StepKind.WAIT, StepKind.QUIT]
    assert first.steps[0].arguments["job-id"] == "job0"
    assert first.steps[1].job == "job0" and first.steps[1].timeout == 30
    assert first.source.endswith("s.toml:1")
    assert second.image == "" and second.main == "disk.raw" and second.grant is Grant.CREATE
    # an op expands to the registered operation's steps
    assert second.steps[1].command == "blockdev-snapshot-sync"
    assert second.steps[1].arguments["node-name"] == "drive0"


def test_the_built_in_matrix_is_expressible_as_files(tmp_path: Path) -> None:
    matrix = build_matrix()
    back = load(_write(tmp_path, dump(matrix)))
    assert [dataclasses.replace(s, source="") for s in back] == [
        dataclasses.replace(s, source="") for s in matrix
    ]
    files = dump_matrix(matrix, tmp_path / "dumped")
    assert sum(len(load(f)) for f in files) == len(matrix)
    assert (tmp_path / "dumped" / "commit-active.toml") in files


@pytest.mark.parametrize(
    ("text", "line", "key", "words"),
    [
        ('[[scenario]]\nname = "a"\nimage = "raw"\ncolour = "red"\n', 4, "scenario[1].colour", "unknown key"),
        ('[[scenario]]\nimage = "raw"\n', 1, "scenario[1].name", "is required"),
        ('[[scenario]]\nname = "a"\nimage = 3\n', 3, "scenario[1].image", "must be a string"),
        ('[[scenario]]\nname = "a"\nimage = "raw"\ngrant = "all"\n', 4, "scenario[1].grant", "not one of"),
        ('[[scenario]]\nname = "a"\nimage = "raw"\n\n[[scenario.steps]]\nqmp = "x"\nhmp = "y"\n', 5, "scenario[1].steps[1]", "exactly one of"),
        ('[[scenario]]\nname = "a"\nimage = "raw"\n\n[[scenario.steps]]\nwait = "E"\ntimeout = "soon"\n', 7, "scenario[1].steps[1].timeout", "number of seconds"),
        ('[[scenario]]\nname = "a"\nimage = "raw"\n\n[[scenario.steps]]\nquit = true\n\n[[scenario.steps]]\nop = "dance"\n', 9, "scenario[1].steps[2].op", "unknown operation 'dance'"),
        ('[[scenario]]\nname = "a"\nimage = "raw"\n\n[[scenario.steps]]\nhmp = "x"\narguments = {}\n', 7, "scenario[1].steps[1].arguments", "does not go with hmp"),
        ('[[scenario]]\nname = "a b"\nimage = "raw"\n', 1, "scenario[1]", "letters, digits"),
        ('[[scenario]]\nname = "a"\nimage = "raw"\n[[scenario]]\nname = "b"\nimage = "raw"\nargs = "-S"\n', 7, "scenario[2].args", "array of strings"),
        ('[[scenario]]\nname = "a"\nimage = "raw\n', 3, "", "not TOML"),
    ],
)  # fmt: skip
def test_a_malformed_file_names_file_line_and_key(
    tmp_path: Path, text: str, line: int, key: str, words: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ScenarioFileError) as info:
        load(path)
    err = info.value
    assert (err.path, err.line, err.key) == (str(path), line, key)
    assert words in str(err) and str(err).startswith(f"{path}:{line}: ")


def test_the_command_reports_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, '[[scenario]]\nname = "a"\nimage = "raw"\nmachine = 1\n')
    assert main(["compare", "--scenario-file", str(path), "--list"]) == 2
    assert f"{path}:4: scenario[1].machine: must be a string" in capsys.readouterr().err
    good = _write(tmp_path, GOOD)
    assert main(["compare", "--scenario-file", str(good), "--only-files", "--list"]) == 0
    out = capsys.readouterr().out
    assert "my-commit" in out and "2 scenarios" in out
    # a file scenario may not reuse a built-in's name
    clash = tmp_path / "clash.toml"
    clash.write_text('[[scenario]]\nname = "raw_drive_read"\nimage = "raw"\n')
    assert main(["compare", "--scenario-file", str(clash), "--list"]) == 2
    assert "defined twice" in capsys.readouterr().err


def test_the_documented_examples_load_and_are_in_the_docs() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs"
    text = (docs / "compare.md").read_text()
    for name in ("commit-chain.toml", "cdrom-swap.toml"):
        path = docs / "examples" / name
        (sc,) = load(path)
        assert sc.name.startswith("user-")
        # the docs show the file as it is
        assert path.read_text().strip() in text, name


def test_dump_scenarios_writes_one_file_per_operation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compare", "--dump-scenarios", str(tmp_path / "d")]) == 0
    files = sorted((tmp_path / "d").glob("*.toml"))
    assert {f.stem for f in files} >= {"commit", "commit-active", "mirror-full", "open", "tray"}
    assert sum(len(load(f)) for f in files) == len(build_matrix())
    assert str(files[0]) in capsys.readouterr().out
