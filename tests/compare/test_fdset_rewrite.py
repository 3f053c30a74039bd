"""The fd-set oracle's libvirt side: what it parses, pre-opens and rewrites (qemu-img, no QEMU)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.compare.runners.common import Binaries, Setup
from testbed.compare.runners.fdset import Libvirt, rewrite_args
from testbed.compare.scenarios import scenario
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
