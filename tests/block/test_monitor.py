"""ModelMachine: QEMU's block options and monitor commands on the model (no QEMU)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from testbed.block.layer import BlockLayer
from testbed.block.monitor import COMMANDS, ModelMachine
from testbed.errors import BlockError
from testbed.pytest_plugin import require


@pytest.fixture
def image(tmp_path: Path) -> Path:
    require(subprocess.run(["which", "qemu-img"], capture_output=True).returncode == 0, "qemu-img")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "d.qcow2"), "1M"],
                   check=True)  # fmt: skip
    (tmp_path / "tmp").mkdir()
    return tmp_path / "d.qcow2"


def _opens(m: ModelMachine, root: Path) -> list[tuple[str, list[str]]]:
    out = []
    for e in m.layer.trace:
        names = [n for n in e.flag_names if n not in ("O_CLOEXEC", "O_LARGEFILE")]
        out.append((os.path.relpath(e.path, root), names))
    return out


def test_drive_and_device_words(image: Path) -> None:
    m = ModelMachine(BlockLayer())
    # -drive's first word is the file; the device takes write permission
    m.launch(
        [
            "-S",
            "-drive",
            f"{image},format=qcow2,if=none,id=d0",
            "-device",
            "virtio-blk-pci,drive=d0",
        ]
    )
    assert _opens(m, image.parent) == [
        ("d.qcow2", ["O_RDONLY", "O_NONBLOCK"]),
        ("d.qcow2", ["O_RDONLY"]),
        ("d.qcow2", ["O_RDWR"]),
    ]
    assert m.layer.drives["d0"].device
    m.quit()


def test_global_snapshot_applies_to_every_drive(image: Path) -> None:
    m = ModelMachine(BlockLayer(), tmpdir=str(image.parent / "tmp"))
    m.launch(["-drive", f"file={image},format=qcow2,if=none,id=d0", "-snapshot"])
    top = m.layer.top("d0")
    assert top.filename.startswith(str(image.parent / "tmp" / "vl."))
    assert top.backing is not None and top.backing.filename == str(image)
    # the temporary file is gone from the directory once open
    assert os.listdir(image.parent / "tmp") == []
    m.quit()


def test_unknown_things_are_named(image: Path) -> None:
    m = ModelMachine(BlockLayer())
    with pytest.raises(
        BlockError, match="-device lsi53c895a: the model knows no such block device"
    ):
        m.launch(["-drive", f"file={image},if=none,id=d0", "-device", "lsi53c895a,drive=d0"])
    with pytest.raises(BlockError, match="does not implement HMP 'info block'"):
        m.hmp("info block")
    with pytest.raises(BlockError, match="missing argument 'device'"):
        m.qmp("block-stream")
    # QMP blockdev-add answers nothing (QEMU: {}), on a fresh machine: d0 holds the lock
    m = ModelMachine(BlockLayer())
    assert "blockdev-add" in COMMANDS and m.qmp("blockdev-add", **{
        "driver": "qcow2", "node-name": "n1", "file": {"driver": "file", "filename": str(image)},
    }) is None  # fmt: skip
