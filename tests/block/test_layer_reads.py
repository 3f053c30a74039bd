"""Guest-visible bytes of whole layered stacks equal ``qemu-img convert -O raw``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.block.layer import BlockLayer
from testbed.block.paths import path_combine
from testbed.errors import BlockError
from testbed.pytest_plugin import require

STACKS = {
    "raw": (
        "disk.raw",
        [
            "qemu-img create -q -f raw disk.raw 3M",
            "qemu-io -f raw -c 'write -q -P 0x5a 0 1M' -c 'write -q -P 0xa5 2M 512k' disk.raw",
        ],
    ),
    "qcow2-over-raw-chain": (
        "c.qcow2",
        [
            "qemu-img create -q -f raw base.raw 3M",
            "qemu-io -f raw -c 'write -q -P 0x11 0 3M' base.raw",
            "qemu-img create -q -f qcow2 -b base.raw -F raw b.qcow2",
            "qemu-io -f qcow2 -c 'write -q -P 0x22 64k 128k' b.qcow2",
            "mkdir sub && qemu-img create -q -f qcow2 -b ../b.qcow2 -F qcow2 sub/c.qcow2",
            "qemu-io -f qcow2 -c 'write -q -P 0x33 100k 8k' -c 'write -q -z 1M 64k' sub/c.qcow2",
            "mv sub/c.qcow2 c.qcow2 && qemu-img rebase -u -b b.qcow2 -F qcow2 c.qcow2",
        ],
    ),
    "qcow2-short-backing": (
        "top.qcow2",
        [
            "qemu-img create -q -f raw base.raw 1M",
            "qemu-io -f raw -c 'write -q -P 0x44 0 1M' base.raw",
            "qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2 2M",
        ],
    ),
    "vmdk-flat": (
        "v.vmdk",
        [
            "qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentFlat v.vmdk 8M",
            "qemu-io -f vmdk -c 'write -q -P 0x66 1M 64k' v.vmdk",
        ],
    ),
    "vmdk-sparse": (
        "v.vmdk",
        [
            "qemu-img create -q -f vmdk -o subformat=monolithicSparse v.vmdk 8M",
            "qemu-io -f vmdk -c 'write -q -P 0x77 3M 64k' v.vmdk",
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(STACKS))
def test_whole_disk_equals_qemu_img_convert(name: str, tmp_path: Path) -> None:
    require(shutil.which("qemu-img") is not None, "qemu-img (qemu-utils)")
    main, steps = STACKS[name]
    for step in steps:
        subprocess.run(["bash", "-ec", step], cwd=tmp_path, check=True)
    subprocess.run(["qemu-img", "convert", "-O", "raw", main, "want.raw"], cwd=tmp_path, check=True)
    want = (tmp_path / "want.raw").read_bytes()
    with BlockLayer() as layer:
        layer.drive_add(filename=str(tmp_path / main), drive_id="d")
        assert layer.virtual_size("d") == len(want)
        assert layer.read("d", 0, len(want)) == want


def test_read_outside_the_disk_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d.raw").write_bytes(bytes(4096))
    with BlockLayer() as layer:
        layer.drive_add(filename=str(tmp_path / "d.raw"), fmt="raw", drive_id="d")
        with pytest.raises(BlockError, match="lie outside"):
            layer.read("d", 4000, 200)


@pytest.mark.parametrize(
    ("base", "name", "want"),
    [
        ("/d/sub/top.qcow2", "../b.raw", "/d/sub/../b.raw"),
        ("/d/top.qcow2", "/abs/b.raw", "/abs/b.raw"),
        ("top.qcow2", "b.raw", "b.raw"),
        ("rel/top.qcow2", "b.raw", "rel/b.raw"),
    ],
)
def test_path_combine_like_qemu(base: str, name: str, want: str) -> None:
    assert path_combine(base, name) == want
