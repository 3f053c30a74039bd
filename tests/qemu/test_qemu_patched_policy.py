"""A refused open: a clear error naming the file, and QEMU carries on."""

from __future__ import annotations

import pytest
from qemu_images import Images

from testbed.broker import Policy
from testbed.qemu import QMPCommandError
from testbed.qemu.fixtures import MachineFactory

pytestmark = pytest.mark.qemu


def test_refused_open_names_the_file_and_qemu_keeps_running(
    patched_qemu: MachineFactory, images: Images
) -> None:
    vm = patched_qemu(policy=Policy.from_grants(ro=[images.raw]))
    with pytest.raises(QMPCommandError) as info:
        vm.qmp(
            "blockdev-add",
            driver="file",
            filename=str(images.vdi),
            **{"node-name": "refused", "read-only": True},
        )
    assert str(images.vdi) in info.value.desc
    assert "Permission denied" in info.value.desc

    vm.qmp(
        "blockdev-add",
        driver="raw",
        **{"node-name": "allowed", "read-only": True},
        file={"driver": "file", "filename": str(images.raw)},
    )
    names = {n["node-name"] for n in vm.qmp("query-named-block-nodes")}
    assert "allowed" in names and "refused" not in names
    records = vm.brokers[0].records
    assert [(r.path, r.result) for r in records] == [
        (str(images.vdi), -13),
        (str(images.raw), 0),
    ]
