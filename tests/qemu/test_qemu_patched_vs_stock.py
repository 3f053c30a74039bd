"""Without -open-hook-fd the patched QEMU opens exactly what stock QEMU opens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from qemu_images import PATTERN, Images, Open

from testbed.qemu.fixtures import MachineFactory

pytestmark = [pytest.mark.qemu, pytest.mark.stock_qemu]


def traced_run(factory: MachineFactory, images: Images, trace: Path, drive: str) -> None:
    vm = factory(
        "-drive",
        f"{drive},if=none,id=drive0",
        wrapper=("strace", "-f", "-qq", "-o", str(trace), "-e", "trace=openat"),
    )
    vm.qemu_io("drive0", f"read -P {PATTERN:#x} 0 4096")
    vm.qmp(
        "blockdev-snapshot-sync",
        device="drive0",
        **{"snapshot-file": str(images.dir / "snap.qcow2")},
        format="qcow2",
    )
    assert vm.shutdown() == "quit"
    (images.dir / "snap.qcow2").unlink()


@pytest.mark.parametrize("kind", ["qcow2", "vmdk_flat"])
def test_same_opens_as_stock(
    kind: str,
    patched_qemu: MachineFactory,
    stock_qemu: MachineFactory,
    images: Images,
    strace: Callable[[Path, Path], list[Open]],
    tmp_path: Path,
) -> None:
    fmt = {"qcow2": "qcow2", "vmdk_flat": "vmdk"}[kind]
    drive = f"file={getattr(images, kind)},format={fmt}"
    traced_run(stock_qemu, images, tmp_path / "stock.trace", drive)
    traced_run(
        lambda *a, **k: patched_qemu(*a, hook=False, **k), images, tmp_path / "patched.trace", drive
    )
    stock = strace(tmp_path / "stock.trace", images.dir)
    patched = strace(tmp_path / "patched.trace", images.dir)
    assert len(stock) > 6  # the images, the backing/extent, the snapshot overlay
    assert patched == stock
