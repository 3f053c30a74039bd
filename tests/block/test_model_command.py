"""``testbed model open``: trace, sha256, and clean errors."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.cli import main
from testbed.pytest_plugin import require


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    require(shutil.which("qemu-img") is not None, "qemu-img (qemu-utils)")
    subprocess.run(["bash", "-ec", (
        "qemu-img create -q -f raw base.raw 2M && "
        "qemu-io -f raw -c 'write -q -P 0x5a 0 1M' base.raw && "
        "qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2"
    )], cwd=tmp_path, check=True)  # fmt: skip
    return tmp_path


def test_json_has_trace_sha256_size_format(chain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "open", str(chain / "top.qcow2"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"trace", "sha256", "virtual_size", "format"}
    assert out["format"] == "qcow2"
    assert out["virtual_size"] == 2 << 20
    want = hashlib.sha256(b"\x5a" * (1 << 20) + bytes(1 << 20)).hexdigest()
    assert out["sha256"] == want
    steps = [
        (Path(t["path"]).name, [n for n in t["flag_names"] if n != "O_CLOEXEC"])
        for t in out["trace"]
    ]
    assert steps == [
        ("top.qcow2", ["O_RDONLY", "O_NONBLOCK"]),
        ("top.qcow2", ["O_RDONLY"]),
        ("top.qcow2", ["O_RDWR"]),
        ("base.raw", ["O_RDONLY", "O_NONBLOCK"]),
        ("base.raw", ["O_RDONLY"]),
        ("top.qcow2", ["O_RDONLY"]),
    ]


def test_snapshot_and_text_output(chain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    snap = chain / "snap.qcow2"
    assert main(["model", "open", str(chain / "top.qcow2"), "--snapshot", str(snap)]) == 0
    out = capsys.readouterr().out
    assert "O_RDWR|O_CREAT|O_CLOEXEC 0644" in out
    assert "sha256 " in out
    assert snap.exists()


def test_missing_image_is_exit_1_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.qcow2"
    assert main(["model", "open", str(missing)]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "No such file" in err


def test_refused_image_is_exit_1(
    chain: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path_factory.mktemp("elsewhere")
    policy = other / "policy.toml"
    policy.write_text(f'[[grant]]\npath = "{other}"\naccess = "rw"\n')
    status = main(["model", "open", str(chain / "top.qcow2"), "--policy", str(policy)])
    err = capsys.readouterr().err
    assert status == 1
    assert "top.qcow2" in err


def test_corrupt_image_is_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 508)
    assert main(["model", "open", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.qcow2" in err and "Traceback" not in err
