"""Snapshots create their overlays through the hook and reopen the old top read-only."""

from __future__ import annotations

import errno
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from qemu_images import PATTERN, Images

from testbed.broker import Broker
from testbed.qemu import Machine
from testbed.qemu.fixtures import MachineFactory

pytestmark = pytest.mark.qemu


def backing_chain(image: Path) -> list[str]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(image)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [Path(layer["filename"]).name for layer in json.loads(out)]


def take_hmp(vm: Machine, overlay: Path) -> None:
    out = vm.hmp(f"snapshot_blkdev drive0 {overlay} qcow2")
    assert out.strip() == "", out


def take_qmp(vm: Machine, overlay: Path) -> None:
    vm.qmp(
        "blockdev-snapshot-sync", device="drive0", **{"snapshot-file": str(overlay)}, format="qcow2"
    )


@pytest.mark.parametrize(
    "take", [take_hmp, take_qmp], ids=["hmp-snapshot_blkdev", "qmp-blockdev-snapshot-sync"]
)
def test_snapshot_overlay_is_created_through_the_hook(
    take: Callable[[Machine, Path], None],
    patched_qemu: MachineFactory,
    broker: Broker,
    images: Images,
) -> None:
    vm = patched_qemu("-drive", f"file={images.qcow2},format=qcow2,if=none,id=drive0")
    overlay = images.dir / "snap.qcow2"
    before = len(broker.records)
    take(vm, overlay)
    assert overlay.exists()
    assert backing_chain(overlay) == ["snap.qcow2", "top.qcow2", "base.raw"]
    assert "Pattern verification failed" not in vm.qemu_io("drive0", f"read -P {PATTERN:#x} 0 512")
    after = broker.records[before:]

    on_overlay = [r for r in after if r.path == str(overlay)]
    # The new file is probed (it does not exist yet), then created 0644 ...
    assert on_overlay[0].result == -errno.ENOENT
    creates = [r for r in on_overlay if "O_CREAT" in r.flag_names]
    assert creates and creates[0].mode == 0o644 and creates[0].result == 0
    # ... then opened read-write as the new active layer.
    assert any(
        r.flag_names[0] == "O_RDWR" and "O_CREAT" not in r.flag_names and r.result == 0
        for r in on_overlay[on_overlay.index(creates[0]) + 1 :]
    )
    # The old top is reopened read-only once the overlay is on top of it.
    first_create = after.index(creates[0])
    assert [list(r.flag_names) for r in after[first_create:] if r.path == str(images.qcow2)] == [
        ["O_RDONLY"]
    ]
    # The base is not touched.
    assert not any(r.path == str(images.raw) for r in after)
