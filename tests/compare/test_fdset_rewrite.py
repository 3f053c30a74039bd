"""The fd-set oracle's libvirt side: what it parses, pre-opens and rewrites (qemu-img, no QEMU)."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.compare.runners.fdset import Libvirt, rewrite_args
from testbed.compare.runners.setup import Binaries, Setup
from testbed.compare.scenarios import scenario
from testbed.errors import ScenarioSetupError
from testbed.pytest_plugin import require


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    require(shutil.which("qemu-img") is not None, "qemu-img")
    for cmd in (
        "qemu-img create -q -f raw base.raw 4M",
        "qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2",
        "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2",
    ):
        subprocess.run(cmd, shell=True, check=True, cwd=tmp_path)
    return tmp_path


def _setup(root: Path, ops: tuple[str, ...], attach: str = "drive-device") -> Setup:
    sc = scenario("qcow2-chain1", attach, ops)
    binaries = Binaries(patched=Path("/nonexistent"), stock=Path("/nonexistent"))
    return Setup(scenario=sc, image=None, root=root, logs=root, binaries=binaries)


def _main(setup: Setup) -> Setup:
    # the chain fixture's top is top.qcow2, like qcow2-chain1's
    sc = dataclasses.replace(setup.scenario, main="top.qcow2", format="qcow2")
    return dataclasses.replace(setup, scenario=sc)


def test_a_chain_is_parsed_and_spelled_out(chain: Path) -> None:
    setup = _main(_setup(chain, ("read",)))
    lib = Libvirt(setup)
    args = rewrite_args(lib, setup.args())
    drive = args[args.index("-drive") + 1]
    assert "file.filename=/dev/fdset/10" in drive
    assert "backing.file.filename=/dev/fdset/11" in drive
    assert "backing.backing.file.filename=/dev/fdset/12" in drive
    assert "backing.node-name=layer11" in drive
    assert lib.report()["headers"] == ["top.qcow2 (qcow2)", "mid.qcow2 (qcow2)", "base.raw (raw)"]
    # only the top is written: the backing files get O_RDONLY only
    assert lib.report()["preopened"] == [
        "top.qcow2 O_RDONLY + O_RDWR (the top of a writable chain)",
        "mid.qcow2 O_RDONLY",
        "base.raw O_RDONLY",
    ]


def test_commit_needs_read_write_fds_for_every_backing_file(chain: Path) -> None:
    setup = _main(_setup(chain, ("commit-active",)))
    lib = Libvirt(setup)
    rewrite_args(lib, setup.args())
    assert lib.report()["preopened"][1:] == [
        "mid.qcow2 O_RDONLY + O_RDWR (block-commit reopens it read-write)",
        "base.raw O_RDONLY + O_RDWR (block-commit reopens it read-write)",
    ]


def test_commit_names_layers_by_node_name(chain: Path) -> None:
    sc = scenario("qcow2-chain3-nofmt", "drive-device", ("commit",))
    setup = Setup(
        scenario=dataclasses.replace(sc, main="top.qcow2", format="qcow2"),
        image=None, root=chain, logs=chain,
        binaries=Binaries(patched=Path("/x"), stock=Path("/x")),
    )  # fmt: skip
    lib = Libvirt(setup)
    rewrite_args(lib, setup.args())
    step = setup.steps()[0]
    step = dataclasses.replace(step, arguments={**step.arguments, "top": f"{chain}/mid.qcow2"})
    out = lib.step(step)
    assert out.arguments["top-node"] == "layer11" and "top" not in out.arguments


def test_a_created_target_is_made_beforehand_with_mode_existing(chain: Path) -> None:
    setup = _main(_setup(chain, ("mirror-full",)))
    lib = Libvirt(setup)
    rewrite_args(lib, setup.args())
    out = lib.step(setup.steps()[0])
    assert out.arguments["mode"] == "existing"
    assert out.arguments["target"].startswith("/dev/fdset/")
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(chain / "mirror.qcow2")],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    assert info["format"] == "qcow2" and info["virtual-size"] == 4 << 20
    assert lib.report()["created"] == [
        "mirror.qcow2 (qemu-img create -f qcow2, then mode=existing)"
    ]


def test_a_read_only_grant_passes_no_write_fds(chain: Path) -> None:
    sc = scenario("qcow2-chain1", "drive-device", ("commit-active",), grant="ro")
    setup = _main(Setup(scenario=sc, image=None, root=chain, logs=chain,
                        binaries=Binaries(patched=Path("/x"), stock=Path("/x"))))  # fmt: skip
    lib = Libvirt(setup)
    rewrite_args(lib, setup.args())
    assert all("O_RDWR" not in p for p in lib.report()["preopened"])


def test_a_medium_change_becomes_blockdev_add_and_insert(chain: Path) -> None:
    sc = scenario("qcow2-chain1", "cdrom", ("change-medium",))
    setup = _main(Setup(scenario=sc, image=None, root=chain, logs=chain,
                        binaries=Binaries(patched=Path("/x"), stock=Path("/x"))))  # fmt: skip
    lib = Libvirt(setup)
    rewrite_args(lib, setup.args())
    out = lib.steps(setup.steps()[0])
    assert [s.command for s in out] == [
        "blockdev-add", "blockdev-open-tray", "blockdev-remove-medium",
        "blockdev-insert-medium", "blockdev-close-tray",
    ]  # fmt: skip
    node = out[0].arguments
    assert node["read-only"] is True and node["node-name"] == "medium1"
    assert node["backing"]["file"]["filename"].startswith("/dev/fdset/")
    assert out[3].arguments == {"id": "cdrom0", "node-name": "medium1"}
    assert lib.report()["headers"] == ["top.qcow2 (qcow2)", "mid.qcow2 (qcow2)", "base.raw (raw)"]


def _direct_setup(root: Path, version: str, ops: tuple[str, ...] = ("read",)) -> Setup:
    sc = scenario("raw", "blockdev", ops, cache_direct=True)
    sc = dataclasses.replace(sc, main="disk.raw", format="raw")
    binaries = Binaries(patched=Path("/x"), stock=Path("/x"), version=version)
    return Setup(scenario=sc, image=None, root=root, logs=root, binaries=binaries)


def test_fdsets_match_o_direct_from_9_1() -> None:
    from testbed.compare.runners.fdset import matches_o_direct

    assert not matches_o_direct("7.2")
    assert not matches_o_direct("9.0")
    assert matches_o_direct("9.1")
    assert matches_o_direct("10.0")
    with pytest.raises(ScenarioSetupError, match="not numbers"):
        matches_o_direct("ten")


def test_cache_direct_members_are_opened_with_o_direct_on_10_only(tmp_path: Path) -> None:
    from testbed.compare.runners.fdset import _open_member

    (tmp_path / "disk.raw").write_bytes(b"\0" * 4096)
    for version, direct in (("7.2", False), ("10.0", True)):
        setup = _direct_setup(tmp_path, version)
        lib = Libvirt(setup)
        rewrite_args(lib, setup.args())
        (m,) = lib.members.values()
        assert m.direct == ("only" if direct else "")
        fds = _open_member(m, inheritable=False)
        try:
            flags = [fcntl.fcntl(fd, fcntl.F_GETFL) for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        assert [bool(f & os.O_DIRECT) for f in flags] == [direct] * len(flags)
        assert ("O_DIRECT" in " ".join(lib.report()["preopened"])) is direct


def test_a_reopen_turning_direct_on_gets_both_kinds(tmp_path: Path) -> None:
    from testbed.compare.runners.fdset import _open_member, asks_direct

    sc = scenario("raw", "file-node", ("reopen-direct",))
    assert asks_direct(sc) == "also"
    assert asks_direct(scenario("raw", "blockdev")) == ""
    (tmp_path / "disk.raw").write_bytes(b"\0" * 4096)
    setup = _direct_setup(tmp_path, "10.0")
    setup = dataclasses.replace(setup, scenario=dataclasses.replace(sc, main="disk.raw"))
    lib = Libvirt(setup)
    (m,) = [lib.member(str(tmp_path / "disk.raw"), late=False)]
    assert m.direct == "also"
    fds = _open_member(m, inheritable=False)
    try:
        flags = sorted(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT) for fd in fds)
    finally:
        for fd in fds:
            os.close(fd)
    assert flags == [False, True]
