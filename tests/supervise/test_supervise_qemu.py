"""Stock QEMU (Debian's 7.2) under the supervisor: the snapshot scenario, Landlock, the control."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

from testbed.broker import Policy, read_audit
from testbed.compare.normalise import from_audit, normalise, parse_strace
from testbed.compare.runners.stock import strace_prefix
from testbed.errors import LaunchError
from testbed.pytest_plugin import require
from testbed.qemu import STOCK_QEMU, Machine, MachineConfig
from testbed.qemu.binaries import is_runnable
from testbed.qemu.fixtures import require_binary
from testbed.qemu.versions import Kind
from testbed.supervise import Supervisor
from testbed.supervise.machine import supervised_config

pytestmark = [pytest.mark.stock_qemu, pytest.mark.slow]


@pytest.fixture
def chain(tmp_path: Path, kernel: None) -> Path:
    """A qcow2 over a raw base, in a directory of its own."""
    require(
        is_runnable(STOCK_QEMU), f"Debian's QEMU {STOCK_QEMU} (apt-get install qemu-system-x86)"
    )
    require(shutil.which("qemu-img") is not None, "qemu-img (apt-get install qemu-utils)")
    d = tmp_path / "images"
    d.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(d / "base.raw"), "4M"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
         str(d / "top.qcow2")],
        check=True,
    )  # fmt: skip
    return d


def snapshot_config(images: Path, log: Path) -> MachineConfig:
    return MachineConfig(
        binary=STOCK_QEMU,
        machine="pc",
        args=(
            "-drive", f"file={images / 'top.qcow2'},format=qcow2,if=none,id=drive0",
            "-S", "-device", "virtio-blk-pci,drive=drive0",
        ),
        log_path=log,
    )  # fmt: skip


def run_snapshot(vm: Machine, images: Path) -> None:
    with vm:
        vm.qmp(
            "blockdev-snapshot-sync",
            device="drive0",
            **{"snapshot-file": str(images / "overlay.qcow2"), "format": "qcow2"},
        )
        assert vm.shutdown() == "quit"


def copy_of(images: Path, name: str) -> Path:
    out = images.parent / name
    shutil.copytree(images, out)
    return out


def test_snapshot_under_landlock_serves_every_image_open_like_strace_shows(
    chain: Path, tmp_path: Path
) -> None:
    require(shutil.which("strace") is not None, "strace (apt-get install strace)")
    # stock QEMU under strace: the reference
    ref = copy_of(chain, "ref")
    strace_out = tmp_path / "strace.txt"
    config = snapshot_config(ref, tmp_path / "stock.log")
    run_snapshot(Machine(dataclasses.replace(config, wrapper=strace_prefix(str(strace_out)))), ref)
    expected = normalise(parse_strace(strace_out.read_text()), ref)
    assert len(expected) >= 10  # probes, the chain, the overlay's create and reopens

    audit = tmp_path / "audit.jsonl"
    config = supervised_config(
        snapshot_config(chain, tmp_path / "supervised.log"),
        Policy.from_grants(create=[chain]),
        workdir=tmp_path,
        landlock=True,
        audit=audit,
    )
    run_snapshot(Machine(config), chain)
    records = read_audit(audit)
    got = normalise(from_audit(records), chain)
    assert [o.line() for o in got] == [o.line() for o in expected]
    assert (chain / "overlay.qcow2").exists()
    # every image open was served (none refused), and each says how
    image_records = [r for r in records if r.path.startswith(str(chain))]
    assert image_records and all(r.reason == "" or r.result == -2 for r in image_records)
    raw = audit.read_text().splitlines()
    assert all('"via":"seccomp"' in line and '"tid":' in line for line in raw)


def test_landlock_only_cannot_open_the_images(chain: Path, tmp_path: Path) -> None:
    config = supervised_config(
        snapshot_config(chain, tmp_path / "landlock-only.log"),
        Policy(),
        workdir=tmp_path,
        landlock_only=True,
    )
    with pytest.raises(LaunchError) as err:
        Machine(config).launch()
    assert f"Could not open '{chain / 'top.qcow2'}': Permission denied" in err.value.log


def test_supervisor_gone_qemu_reports_enosys_and_keeps_its_open_images(
    chain: Path, tmp_path: Path
) -> None:
    """Serving stops (as when the supervisor dies: the listener closes): QEMU's next
    open fails with its own clear error, and the images it has open keep working."""
    ours, theirs = socket.socketpair()
    sup = Supervisor(Policy.from_grants(create=[chain]))
    log = open(tmp_path / "qemu.log", "wb")  # noqa: SIM115
    try:
        proc = sup.popen(
            [
                STOCK_QEMU, "-nodefaults", "-display", "none", "-machine", "none",
                "-chardev", f"socket,id=qmp,fd={theirs.fileno()}",
                "-mon", "chardev=qmp,mode=control",
                "-drive", f"file={chain / 'top.qcow2'},format=qcow2,if=none,id=drive0",
            ],
            pass_fds=(theirs.fileno(),),
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        theirs.close()

        async def drive() -> tuple[str, str]:
            qmp = QMPClient("supervised")
            await asyncio.wait_for(qmp.connect(ours), 30)
            sup.stop()
            try:
                await qmp.execute(
                    "blockdev-snapshot-sync",
                    {
                        "device": "drive0",
                        "snapshot-file": str(chain / "o.qcow2"),
                        "format": "qcow2",
                    },
                )
                snapshot = "worked"
            except ExecuteError as err:
                snapshot = err.error.error.desc
            read = await qmp.execute(
                "human-monitor-command", {"command-line": 'qemu-io drive0 "read 0 4096"'}
            )
            await qmp.execute("quit")
            await qmp.disconnect()
            return snapshot, str(read)

        snapshot, read = asyncio.run(asyncio.wait_for(drive(), 60))
        proc.wait(30)
    finally:
        ours.close()
        log.close()
        sup.close()
    assert "Function not implemented" in snapshot
    assert "error" not in read.lower() and "failed" not in read.lower()
    assert "read 4096/4096 bytes" in (tmp_path / "qemu.log").read_text()


def test_supervise_cli_runs_every_versions_stock_qemu(qemu_version: str, tmp_path: Path) -> None:
    """`testbed supervise -- QEMU -machine help` for each stock binary, as iotests runs it.

    10.0's stock oracle is a build with a prefix: it reads
    ``bin/../etc/qemu/qemu.conf``, and a refusal there (EACCES) is fatal, so
    the system profile must grant the build's own prefix.
    """
    binary = require_binary(qemu_version, Kind.STOCK)
    audit = tmp_path / "audit.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "testbed", "supervise", "--audit", str(audit), "--",
         str(binary), "-machine", "help"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "pc-q35" in run.stdout
    # libpmem's constructor runs fts_open, which opens "." only to return to
    # the working directory later; refusing it is harmless (QEMU goes on).
    refused = [r for r in read_audit(audit) if r.result == -errno.EACCES and r.path != "."]
    assert not refused, refused
