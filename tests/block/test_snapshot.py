"""Snapshots through the broker: overlays QEMU accepts, data where QEMU puts it."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.block.layer import BlockLayer
from testbed.broker import Broker, Policy
from testbed.errors import BlockError
from testbed.pytest_plugin import require
from testbed.transport import HookClient

MiB = 1 << 20


def _run(*argv: str, cwd: Path) -> str:
    return subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def layer(tmp_path: Path) -> Iterator[BlockLayer]:
    require(shutil.which("qemu-img") is not None, "qemu-img (qemu-utils)")
    ours, theirs = socket.socketpair()
    broker = Broker(Policy.from_grants(rw=[str(tmp_path)], create=[str(tmp_path)]))
    broker.add_connection(ours)
    with broker, HookClient(theirs) as client:
        yield BlockLayer(client)


def test_three_snapshot_levels_pass_qemu_img(tmp_path: Path, layer: BlockLayer) -> None:
    _run("qemu-img", "create", "-q", "-f", "raw", "base.raw", "4M", cwd=tmp_path)
    _run("qemu-io", "-f", "raw", "-c", "write -q -P 0x11 0 1M", "base.raw", cwd=tmp_path)
    layer.drive_add(filename=str(tmp_path / "base.raw"), fmt="raw", drive_id="drive0")
    layer.attach_device("drive0")
    expected = bytearray(layer.read("drive0", 0, 4 * MiB))
    for level, pattern in enumerate((0x22, 0x33, 0x44), start=1):
        overlay = str(tmp_path / f"s{level}.qcow2")
        if level == 2:
            layer.hmp_snapshot_blkdev("drive0", overlay)
        else:
            layer.blockdev_snapshot_sync("drive0", overlay, "qcow2")
        # Writes after a snapshot land in the new overlay, at a new place each level.
        data = bytes([pattern]) * 65536
        layer.write("drive0", level * MiB + 4096, data)
        expected[level * MiB + 4096 : level * MiB + 4096 + len(data)] = data
    assert layer.read("drive0", 0, 4 * MiB) == expected
    layer.quit()

    top = tmp_path / "s3.qcow2"
    _run("qemu-img", "check", "-q", str(top), cwd=tmp_path)
    info = json.loads(
        _run("qemu-img", "info", "--output=json", "--backing-chain", str(top), cwd=tmp_path)
    )
    assert [Path(i["filename"]).name for i in info] == [
        "s3.qcow2",
        "s2.qcow2",
        "s1.qcow2",
        "base.raw",
    ]
    assert [i["format"] for i in info] == ["qcow2", "qcow2", "qcow2", "raw"]
    _run("qemu-img", "convert", "-O", "raw", str(top), "out.raw", cwd=tmp_path)
    assert (tmp_path / "out.raw").read_bytes() == bytes(expected)
    # The old tops kept their own data: s1 holds only level 1's write.
    _run("qemu-img", "convert", "-O", "raw", "s1.qcow2", "s1.raw", cwd=tmp_path)
    s1 = (tmp_path / "s1.raw").read_bytes()
    assert s1[MiB + 4096 : MiB + 4096 + 65536] == b"\x22" * 65536
    assert s1[2 * MiB + 4096 : 2 * MiB + 4096 + 65536] == bytes(65536)


def test_snapshot_mode_existing_uses_the_given_overlay(tmp_path: Path, layer: BlockLayer) -> None:
    _run("qemu-img", "create", "-q", "-f", "qcow2", "top.qcow2", "4M", cwd=tmp_path)
    _run("qemu-io", "-f", "qcow2", "-c", "write -q -P 0x5a 0 64k", "top.qcow2", cwd=tmp_path)
    _run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "top.qcow2",
        "-F",
        "qcow2",
        "snap.qcow2",
        cwd=tmp_path,
    )
    layer.drive_add(filename=str(tmp_path / "top.qcow2"), drive_id="drive0")
    layer.attach_device("drive0")
    before = len(layer.trace)
    layer.blockdev_snapshot_sync("drive0", str(tmp_path / "snap.qcow2"), mode="existing")
    created = [ev for ev in layer.trace[before:] if ev.flag_names.count("O_CREAT")]
    assert created == []
    layer.write("drive0", 65536, b"\x77" * 512)
    assert layer.read("drive0", 0, 4) == b"\x5a" * 4
    layer.quit()
    _run("qemu-img", "check", "-q", "snap.qcow2", cwd=tmp_path)
    out = _run("qemu-io", "-f", "qcow2", "-c", "read -P 0x77 64k 512", "snap.qcow2", cwd=tmp_path)
    assert "Pattern verification failed" not in out


def test_snapshot_of_unknown_drive_is_a_block_error(layer: BlockLayer, tmp_path: Path) -> None:
    from testbed.errors import BlockError

    with pytest.raises(BlockError, match="no drive or node named 'nope'"):
        layer.blockdev_snapshot_sync("nope", str(tmp_path / "s.qcow2"))


def test_an_overlay_in_a_format_the_model_cannot_create_is_refused_before_any_open(
    tmp_path: Path, layer: BlockLayer
) -> None:
    _run("qemu-img", "create", "-q", "-f", "raw", "base.raw", "1M", cwd=tmp_path)
    layer.drive_add(filename=str(tmp_path / "base.raw"), fmt="raw", drive_id="drive0")
    with pytest.raises(BlockError, match="creates qcow2 overlays only, not 'vmdk'"):
        layer.blockdev_snapshot_sync("drive0", str(tmp_path / "s.vmdk"), "vmdk")
    assert not (tmp_path / "s.vmdk").exists()
