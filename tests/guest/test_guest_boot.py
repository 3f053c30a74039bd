"""The guest booted through -open-hook-fd: every format, live snapshots, a
sandbox, and broker faults.  Each test is one boot (about 5-10 s under TCG).

They need ``make guest`` and, except the stock baseline, ``make qemu``; they
skip locally and fail under CI=true when those are missing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from testbed.errors import KernelFeatureError, LaunchError, QEMUError
from testbed.guest.artifacts import guest_available
from testbed.guest.boot import BootOptions, run_boot
from testbed.guest.disk import FORMATS
from testbed.guest.sandbox import Sandbox
from testbed.guest.session import Session, SessionConfig
from testbed.pytest_plugin import require
from testbed.qemu import Kind
from testbed.qemu.fixtures import require_binary
from testbed.supervise.landlock import abi_version
from testbed.supervise.seccomp import check_user_notification

pytestmark = [pytest.mark.guest, pytest.mark.slow]

#: How QEMU words a dead broker's errno (the hook's sendmsg/recvmsg failing).
DEAD_BROKER = r"Broken pipe|Connection reset by peer|Transport endpoint|EPIPE|ECONNRESET"


@pytest.fixture
def guest() -> None:
    require(guest_available(), "the guest kernel and initramfs (run `make guest`)")


@pytest.fixture
def patched(guest: None, qemu_version: str) -> Path:
    """The patched build of the test's QEMU version (every built one: in the test id)."""
    return require_binary(qemu_version, Kind.PATCHED)


@pytest.fixture
def stock(guest: None, qemu_version: str) -> Path:
    """The version's stock binary: Debian's for 7.2, the unpatched build for 10.0."""
    return require_binary(qemu_version, Kind.STOCK)


def config(tmp_path: Path, fmt: str, version: str, **kw: object) -> SessionConfig:
    return SessionConfig(fmt=fmt, workdir=tmp_path / fmt, qemu_version=version, **kw)  # type: ignore[arg-type]


def audited_paths(session: Session) -> list[str]:
    broker = session.broker
    assert broker is not None
    return [r.path for r in broker.records]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_boots_through_the_hook(
    patched: Path, tmp_path: Path, fmt: str, qemu_version: str
) -> None:
    with Session(config(tmp_path, fmt, qemu_version)) as s:
        assert s.disk is not None
        if fmt == "vvfat":
            s.check_fat()
        else:
            s.check_pattern()
            s.start_writer(12)
            s.finish_writer()
        assert s.shutdown() == "exited"
        if fmt != "vvfat":
            report = s.verify()
            assert report.verified == 12 and not report.lost
        paths = audited_paths(s)
    # the image reached QEMU through the broker
    want = str(s.disk.path) if fmt != "vvfat" else str(s.disk.path / "large.bin")
    assert want in paths, paths


def test_live_snapshots_hmp_then_qmp_lose_nothing(
    patched: Path, tmp_path: Path, qemu_version: str
) -> None:
    with Session(config(tmp_path, "raw", qemu_version)) as s:
        s.check_pattern()
        s.start_writer(40)
        s.wait_synced(8)
        first = s.snapshot("hmp")
        s.wait_synced(20)
        second = s.snapshot("qmp")
        s.finish_writer()
        s.shutdown()
        report = s.verify()
        paths = audited_paths(s)
    assert report.verified == 40
    assert [n for n, _ in report.per_layer] == ["disk.raw", "snap1.qcow2", "snap2.qcow2"]
    # each older file holds what was synced before its snapshot, nothing from after
    assert first.synced_before >= 8 and second.synced_before >= 20
    assert str(second.overlay) in paths


def test_sandboxed_qemu_works_only_through_the_hook(
    patched: Path, tmp_path: Path, qemu_version: str
) -> None:
    with Session(config(tmp_path, "qcow2", qemu_version, sandbox=Sandbox.NAMESPACE)) as s:
        s.check_pattern()
        s.start_writer(10)
        s.wait_synced(3)
        s.snapshot("qmp")
        s.finish_writer()
        s.shutdown()
        assert s.verify().verified == 10
    # the same QEMU without the hook, in the same namespace, cannot see the image
    blind = Session(
        config(
            tmp_path / "blind",
            "qcow2",
            qemu_version,
            sandbox=Sandbox.NAMESPACE,
            hook=False,
            qemu=patched,
        )
    )
    with pytest.raises(LaunchError) as info:
        blind.start()
    blind.close()
    assert blind.disk is not None
    assert str(blind.disk.path) in str(info.value)
    assert "No such file or directory" in info.value.log


def test_killed_broker_fails_the_next_snapshot_only(
    patched: Path, tmp_path: Path, qemu_version: str
) -> None:
    with Session(config(tmp_path, "qcow2", qemu_version, broker_process=True)) as s:
        s.check_pattern()
        s.start_writer(40)
        s.wait_synced(5)
        s.kill_broker()
        s.wait_synced(12)  # the guest goes on writing through the fds QEMU holds
        with pytest.raises(QEMUError) as info:
            s.snapshot("qmp")
        assert "snap1.qcow2" in str(info.value)
        assert re.search(DEAD_BROKER, str(info.value)), str(info.value)
        assert s.vm.is_running()
        assert s.vm.qmp("query-status")["status"] == "running"
        s.finish_writer()
        s.shutdown()
        report = s.verify()
    assert report.verified == 40 and not report.lost
    assert not (tmp_path / "qcow2" / "images" / "snap1.qcow2").exists()


def test_refused_snapshot_file_is_a_qmp_error(
    patched: Path, tmp_path: Path, qemu_version: str
) -> None:
    with Session(config(tmp_path, "qcow2", qemu_version, allow_create=False)) as s:
        s.check_pattern()
        s.start_writer(20)
        s.wait_synced(4)
        with pytest.raises(QEMUError, match="Permission denied") as info:
            s.snapshot("qmp")
        assert "snap1.qcow2" in str(info.value)
        with pytest.raises(QEMUError, match="Permission denied"):
            s.snapshot("hmp")
        s.finish_writer()  # the guest did not notice
        s.check_pattern()
        s.shutdown()
        assert s.verify().verified == 20
        broker = s.broker
        assert broker is not None
        refused = [r for r in broker.records if r.path.endswith("snap1.qcow2")]
    assert refused and all(r.result == -13 for r in refused)


@pytest.mark.stock_qemu
def test_stock_qemu_baseline_without_hook(stock: Path, tmp_path: Path, qemu_version: str) -> None:
    """The same scenario on the version's stock QEMU: tells guest bugs from hook bugs."""
    with Session(config(tmp_path, "raw", qemu_version, hook=False)) as s:
        s.check_pattern()
        s.start_writer(10)
        s.wait_synced(3)
        s.snapshot("hmp")
        s.finish_writer()
        s.shutdown()
        assert s.verify().verified == 10


def test_sandboxed_vvfat_scans_its_directory_through_the_hook(
    patched: Path, tmp_path: Path, qemu_version: str
) -> None:
    """Patch 0008: with the tree hidden, vvfat still lists it (through the broker)."""
    s = Session(config(tmp_path, "vvfat", qemu_version, sandbox=Sandbox.NAMESPACE))
    try:
        s.start()
        s.check_fat()  # the guest mounts the FAT disk and checksums the host files
        assert any(r.flags & os.O_DIRECTORY and r.result == 0 for r in s.audit_records())
    finally:
        s.close()


def test_killed_broker_is_replaced_and_nothing_is_lost(
    patched: Path, tmp_path: Path, qemu_version: str
) -> None:
    """Patch 0007 with a guest writing: kill, a failing snapshot, reattach, a good snapshot."""
    opts = BootOptions(
        fmt="qcow2", workdir=tmp_path / "kill", kill_broker_at=8, qemu_version=qemu_version
    )
    result = run_boot(opts)
    assert result.ok, result.error
    restart = result.restart
    assert restart is not None
    assert "snap-dead-broker.qcow2" in restart.failed_snapshot
    assert "the open hook (-open-hook-fd) failed" in restart.failed_snapshot
    assert not (tmp_path / "kill" / "images" / "snap-dead-broker.qcow2").exists()
    # the first broker served the boot, the second the snapshot after the reattach
    assert len(restart.audit_per_broker) == 2 and all(restart.audit_per_broker)
    assert restart.accounted, restart.to_json()
    assert restart.hook_failures >= 1
    assert result.snapshot_files == (str(tmp_path / "kill" / "images" / "snap1.qcow2"),)
    assert result.records_written == 40 and result.records_verified == 40 and result.lost == 0
    assert restart.kill_to_snapshot > restart.reattach_to_snapshot > 0


# -- Landlock, and the seccomp supervisor (no patch) -----------------------------------


@pytest.fixture
def landlock() -> None:
    """Seccomp user notification and Landlock in the running kernel."""
    try:
        check_user_notification()
        abi_version()
    except KernelFeatureError as err:
        require(False, str(err))


@pytest.mark.stock_qemu
@pytest.mark.parametrize("fmt", FORMATS)
def test_supervised_stock_qemu_under_landlock_boots_every_format(
    stock: Path, landlock: None, tmp_path: Path, fmt: str, qemu_version: str
) -> None:
    """No patch: the supervisor serves every open, and Landlock keeps QEMU off the images."""
    cfg = config(tmp_path, fmt, qemu_version, hook=False, supervise=True, sandbox=Sandbox.LANDLOCK)
    with Session(cfg) as s:
        assert s.disk is not None
        if fmt == "vvfat":
            s.check_fat()
        else:
            s.check_pattern()
            s.start_writer(16)
            s.wait_synced(5)
            mark = s.snapshot("qmp")
            s.finish_writer()
        assert s.shutdown() == "exited"
        audit = s.audit_records()
        if fmt != "vvfat":
            report = s.verify()
            assert report.verified == 16 and not report.lost
            assert [n for n, _ in report.per_layer] == [s.disk.path.name, "snap1.qcow2"]
    served = {r.path for r in audit if r.result >= 0 and r.via == "seccomp"}
    if fmt == "vvfat":
        # its tree scan is openat(O_DIRECTORY), served as any open
        assert str(s.disk.path) in served and str(s.disk.path / "large.bin") in served
    else:
        assert {str(s.disk.path), str(mark.overlay)} <= served, sorted(served)
    # the guest files: QEMU reads -kernel/-initrd with plain open(), served here too
    assert any(p.endswith("vmlinuz") for p in served), sorted(served)


@pytest.mark.parametrize("fmt", ["qcow2", "vvfat"])
def test_patched_qemu_under_landlock_works_through_the_hook(
    patched: Path, landlock: None, tmp_path: Path, fmt: str, qemu_version: str
) -> None:
    """Landlock instead of the mount namespace: the images reach QEMU only through the hook."""
    with Session(config(tmp_path, fmt, qemu_version, sandbox=Sandbox.LANDLOCK)) as s:
        assert s.disk is not None
        if fmt == "vvfat":
            s.check_fat()
        else:
            s.check_pattern()
            s.start_writer(10)
            s.wait_synced(3)
            s.snapshot("qmp")
            s.finish_writer()
        s.shutdown()
        if fmt != "vvfat":
            assert s.verify().verified == 10
        paths = audited_paths(s)
    want = str(s.disk.path) if fmt != "vvfat" else str(s.disk.path / "large.bin")
    assert want in paths, paths


def test_same_qemu_under_landlock_only_cannot_open_the_disk(
    patched: Path, landlock: None, tmp_path: Path, qemu_version: str
) -> None:
    """The negative control: Landlock, no hook, nothing served: QEMU gets EACCES on its disk."""
    cfg = config(
        tmp_path, "qcow2", qemu_version, sandbox=Sandbox.LANDLOCK, hook=False, qemu=patched
    )
    blind = Session(cfg)
    with pytest.raises(LaunchError) as info:
        blind.start()
    blind.close()
    assert blind.disk is not None
    assert str(blind.disk.path) in info.value.log
    assert "Permission denied" in info.value.log
