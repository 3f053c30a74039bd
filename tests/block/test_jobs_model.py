"""Model jobs without QEMU: the state machine, events, graph changes, refusals."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from testbed.block.jobs import TRANSITIONS, JobStatus
from testbed.block.layer import BlockLayer
from testbed.block.monitor import ModelMachine
from testbed.errors import BlockError, WaitTimeout
from testbed.pytest_plugin import require


def _chain(d: Path) -> None:
    require(subprocess.run(["which", "qemu-img"], capture_output=True).returncode == 0, "qemu-img")
    for cmd in (
        "qemu-img create -q -f raw base.raw 4M",
        "qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2",
        "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2",
    ):
        subprocess.run(cmd, shell=True, check=True, cwd=d)


@pytest.fixture
def vm(tmp_path: Path) -> ModelMachine:
    _chain(tmp_path)
    m = ModelMachine(BlockLayer())
    m.launch(["-drive", f"file={tmp_path}/top.qcow2,format=qcow2,if=none,id=drive0",
              "-device", "virtio-blk-pci,drive=drive0"])  # fmt: skip
    return m


def test_every_state_but_null_leads_somewhere() -> None:
    assert all(TRANSITIONS[s] for s in JobStatus if s is not JobStatus.NULL)
    assert not TRANSITIONS[JobStatus.NULL]


def test_active_commit_waits_for_complete(vm: ModelMachine, tmp_path: Path) -> None:
    vm.qmp("block-commit", device="drive0", **{"job-id": "j"})
    assert vm.wait("BLOCK_JOB_READY", job="j")["data"]["type"] == "commit"
    with pytest.raises(WaitTimeout, match="BLOCK_JOB_COMPLETED of job 'j'"):
        vm.wait("BLOCK_JOB_COMPLETED", job="j")
    assert vm.qmp("query-block-jobs")[0]["status"] == "ready"
    vm.qmp("block-job-complete", device="j")
    vm.wait("BLOCK_JOB_COMPLETED", job="j")
    # the device now sits on the base, the rest of the chain is gone
    top = vm.layer.top("drive0")
    assert top.filename == f"{tmp_path}/base.raw" and top.backing is None
    assert vm.qmp("query-block-jobs") == []
    statuses = [e["data"]["status"] for e in vm.events if e["event"] == "JOB_STATUS_CHANGE"]
    assert statuses == ["running", "ready", "concluded", "null"]


def test_intermediate_commit_drops_the_layer(vm: ModelMachine, tmp_path: Path) -> None:
    vm.qmp("block-commit", device="drive0", top=f"{tmp_path}/mid.qcow2", **{"job-id": "j"})
    vm.wait("BLOCK_JOB_COMPLETED", job="j")
    chain = [n.filename for n in vm.layer.top("drive0").chain()]
    assert chain == [f"{tmp_path}/top.qcow2", f"{tmp_path}/base.raw"]
    # the base went back to read-only
    assert vm.layer.top("drive0").backing.read_only  # type: ignore[union-attr]


def test_job_refusals_name_what_was_wrong(vm: ModelMachine, tmp_path: Path) -> None:
    with pytest.raises(BlockError, match="Can't find '/nowhere' to use as top"):
        vm.qmp("block-commit", device="drive0", top="/nowhere")
    with pytest.raises(BlockError, match="Block job 'nope' not found"):
        vm.qmp("block-job-complete", device="nope")
    vm.qmp("drive-mirror", device="drive0", target=f"{tmp_path}/m.qcow2", sync="full",
           **{"job-id": "m"})  # fmt: skip
    with pytest.raises(BlockError, match="already in use"):
        vm.qmp("block-stream", device="drive0", **{"job-id": "m"})
    with pytest.raises(BlockError, match="sync 'most'"):
        vm.qmp("drive-backup", device="drive0", target=f"{tmp_path}/b.qcow2", sync="most")
    with pytest.raises(BlockError, match="does not implement QMP 'block-dirty-bitmap-add'"):
        vm.qmp("block-dirty-bitmap-add")
    # quit cancels the running mirror and closes everything
    vm.quit()
    assert vm.layer.drives == {}


def test_mirror_pivots_onto_the_target(vm: ModelMachine, tmp_path: Path) -> None:
    vm.qmp("drive-mirror", device="drive0", target=f"{tmp_path}/m.qcow2", sync="top",
           format="qcow2", **{"job-id": "m"})  # fmt: skip
    vm.wait("BLOCK_JOB_READY", job="m")
    vm.qmp("block-job-complete", device="m")
    top = vm.layer.top("drive0")
    assert top.filename == f"{tmp_path}/m.qcow2"
    assert [n.filename for n in top.chain()[1:]] == [
        f"{tmp_path}/mid.qcow2",
        f"{tmp_path}/base.raw",
    ]
    out = subprocess.run(
        ["qemu-img", "info", f"{tmp_path}/m.qcow2"], capture_output=True, text=True
    )
    assert f"backing file: {tmp_path}/mid.qcow2" in out.stdout


def test_cdrom_tray(tmp_path: Path) -> None:
    _chain(tmp_path)
    vm = ModelMachine(BlockLayer())
    vm.launch(["-drive", "if=none,id=cd0,media=cdrom", "-device", "ide-cd,drive=cd0,id=cdrom0"])
    with pytest.raises(BlockError, match="Tray of device 'cdrom0' is not open"):
        vm.qmp("blockdev-remove-medium", id="cdrom0")
    vm.qmp("blockdev-change-medium", id="cdrom0", filename=f"{tmp_path}/top.qcow2")
    tray = vm.media.tray("cdrom0")
    assert tray.medium is not None and tray.medium.read_only
    vm.qmp("eject", id="cdrom0")
    assert tray.medium is None and tray.open
    with pytest.raises(BlockError, match="Device 'cd9' not found"):
        vm.qmp("eject", id="cd9")
