"""A few real scenarios end to end: patched QEMU + broker, stock QEMU + strace, fd sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.compare.compare import Status
from testbed.compare.run import ScenarioResult, run_scenario
from testbed.compare.runners.images import ImageInfo, load_index
from testbed.compare.runners.setup import Binaries
from testbed.compare.scenarios import build_matrix
from testbed.pytest_plugin import require
from testbed.qemu import STOCK_QEMU, built_versions
from testbed.qemu.binaries import REPO_ROOT, is_runnable, patched_qemu_path

pytestmark = [pytest.mark.qemu, pytest.mark.stock_qemu, pytest.mark.images]

INDEX = REPO_ROOT / "build" / "images" / "index.json"
MATRIX = {s.name: s for s in build_matrix()}


@pytest.fixture(scope="module")
def images() -> dict[str, ImageInfo]:
    require(INDEX.exists(), f"image index {INDEX} (run `make images`)")
    require(is_runnable(patched_qemu_path()), f"patched QEMU {patched_qemu_path()}")
    require(is_runnable(STOCK_QEMU), f"Debian's QEMU {STOCK_QEMU}")
    return load_index(INDEX)


def run(
    name: str,
    images: dict[str, ImageInfo],
    tmp_path: Path,
    oracles: tuple[str, ...] = ("patched", "stock", "fdset"),
) -> ScenarioResult:
    sc = MATRIX[name]
    require(sc.image in images, f"image {sc.image} in {INDEX}")
    binaries = Binaries(patched=patched_qemu_path(), stock=STOCK_QEMU)
    return run_scenario(sc, images[sc.image], tmp_path, oracles, binaries=binaries)


def test_snapshot_on_a_chain(images: dict[str, ImageInfo], tmp_path: Path) -> None:
    r = run(
        "qcow2-chain1_drive-device_read-snapshot-qmp",
        images,
        tmp_path,
        ("model", "patched", "stock", "fdset"),
    )
    assert r.oracles["patched"].ok, r.oracles["patched"].operations
    assert r.pair("patched", "stock").status == Status.MATCH, r.pair("patched", "stock").diff
    assert r.oracles["model"].ok, r.oracles["model"].operations
    assert r.pair("model", "patched").status == Status.MATCH, r.pair("model", "patched").diff
    lines = [o.line() for o in r.oracles["patched"].trace]
    assert lines[:3] == [
        "probe top.qcow2 O_RDONLY|O_NONBLOCK -> ok",
        "open top.qcow2 O_RDONLY -> ok",
        "open top.qcow2 O_RDWR -> ok",
    ]
    assert "open snap.qcow2 O_RDWR|O_CREAT 0o644 -> ok" in lines
    # quit drops the new top back to read-only
    assert lines[-1] == "open snap.qcow2 O_RDONLY -> ok"
    # fd sets, with the chain spelled out as libvirt does, manage this one
    assert r.oracles["fdset"].ok, r.oracles["fdset"].operations
    assert r.oracles["fdset"].extra["headers"] == ["top.qcow2 (qcow2)", "base.raw (raw)"]


def test_fd_sets_cannot_name_vmdk_extents(images: dict[str, ImageInfo], tmp_path: Path) -> None:
    r = run("vmdk-monolithicFlat_drive_read", images, tmp_path)
    assert r.pair("patched", "stock").status == Status.MATCH
    assert "open disk-flat.vmdk O_RDONLY -> ok" in [o.line() for o in r.oracles["patched"].trace]
    assert "/dev/fdset/disk-flat.vmdk" in r.oracles["fdset"].first_error


def test_blockdev_raw_works_with_fd_sets(images: dict[str, ImageInfo], tmp_path: Path) -> None:
    r = run("raw_blockdev_read", images, tmp_path)
    assert r.pair("patched", "stock").status == Status.MATCH
    assert [o.line() for o in r.oracles["patched"].trace] == ["open disk.raw O_RDWR -> ok"]
    assert r.oracles["fdset"].ok, r.oracles["fdset"].operations


def test_vvfat_directory_scan_goes_through_the_hook(
    images: dict[str, ImageInfo], tmp_path: Path
) -> None:
    # With patch 0008 the hook sees the directory scan strace shows: the
    # only divergence left is the relative-name probe's errno.
    r = run("vvfat-floppy_drive_read", images, tmp_path, ("model", "patched", "stock"))
    p = r.pair("patched", "stock")
    assert p.status == Status.KNOWN and set(p.divergences) == {"relative-name"}
    scans = [o for o in r.oracles["patched"].trace if "O_DIRECTORY" in o.flags]
    assert scans and scans[0].path == "tree"
    assert r.pair("model", "patched").status == Status.MATCH


def test_refused_backing_file(images: dict[str, ImageInfo], tmp_path: Path) -> None:
    r = run("qcow2-chain1_hotplug_read_grant-main", images, tmp_path)
    patched = r.oracles["patched"]
    assert patched.operations[1][0] == "blockdev-add"
    assert "Permission denied" in patched.operations[1][1]
    assert patched.trace[-1].path == "base.raw" and patched.trace[-1].result == "EACCES"
    assert r.pair("patched", "stock").status == Status.KNOWN
    # stock QEMU, with nobody to refuse, opened the base
    assert r.oracles["stock"].ok
    # libvirt refuses by not passing the base: QEMU finds no fd set for it
    assert not r.oracles["fdset"].ok


def test_command_writes_json_and_reports(images: dict[str, ImageInfo], tmp_path: Path) -> None:
    from testbed.cli import main

    out = tmp_path / "out"
    status = main(
        [
            "compare",
            "--scenario",
            "raw_drive_read",
            "--oracles",
            "patched,stock",
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(out / "c.json"),
            "--report",
            str(out),
        ]
    )
    assert status == 0
    data = json.loads((out / "c.json").read_text())
    # once per built version (the default), each with its version
    assert [sc["qemu_version"] for sc in data["scenarios"]] == list(built_versions())
    for sc in data["scenarios"]:
        assert sc["name"] == "raw_drive_read" and sc["status"] == Status.MATCH
        assert sc["patched"]["trace"] == sc["stock"]["trace"] != []
    assert "raw_drive_read" in (out / "report.md").read_text()
    assert "<table" in (out / "report.html").read_text()


@pytest.mark.parametrize("version", ["7.2", "10.0"])
@pytest.mark.parametrize("name", ["raw_blockdev+direct_read", "raw_file-node_reopen-direct"])
def test_fd_sets_work_with_o_direct_on_every_version(
    images: dict[str, ImageInfo], tmp_path: Path, name: str, version: str
) -> None:
    # 10.0 matches O_DIRECT when it picks a member (7.2 does not): the
    # testbed as libvirt must pass O_DIRECT fds there, and only there
    binaries = Binaries.of(version)
    require(is_runnable(binaries.stock), f"stock QEMU {version} {binaries.stock}")
    sc = MATRIX[name]
    r = run_scenario(sc, images[sc.image], tmp_path, ("fdset",), binaries=binaries)
    fd = r.oracles["fdset"]
    assert fd.ok, fd.operations
    assert r.qemu_version == version
    assert ("O_DIRECT" in " ".join(fd.extra["preopened"])) is (version != "7.2")


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_a_sync_none_mirror_pivot_follows_each_version(
    images: dict[str, ImageInfo], tmp_path: Path, version: str
) -> None:
    # 7.2 reopens the old top read-only at the pivot; 10.0 keeps its
    # read-write fd until quit, which drops the new top first.  The model
    # takes the version (testbed/block/jobs.py) and must match both.
    from testbed.qemu import Kind, qemu_binary
    from testbed.qemu.binaries import is_runnable

    binaries = Binaries.of(version)
    require(is_runnable(binaries.patched), f"patched QEMU {version} (make qemu)")
    require(is_runnable(qemu_binary(version, Kind.STOCK)), f"stock QEMU {version} (make qemu)")
    sc = MATRIX["qcow2-chain1_drive-device_mirror-none"]
    r = run_scenario(sc, images[sc.image], tmp_path, ("model", "patched"), binaries=binaries)
    assert r.pair("model", "patched").status == Status.MATCH
    tail = [(o.path, o.flags) for o in r.oracles["patched"].trace[-2:]]
    first, second = (
        ("top.qcow2", "mirror.qcow2") if version == "7.2" else ("mirror.qcow2", "top.qcow2")
    )
    assert [p for p, _ in tail] == [first, second]
