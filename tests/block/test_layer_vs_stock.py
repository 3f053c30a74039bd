# ruff: noqa: E501 - the scenario table reads best one scenario per line
"""The model's open trace equals stock QEMU 7.2's (strace), scenario by scenario.

Each scenario is one QEMU command line plus QMP commands, and the same
calls on :class:`BlockLayer` (through ``os.open``: the broker adds nothing
to what is opened).  Stock QEMU runs under strace; see
``stock_qemu_oracle``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from stock_qemu_oracle import available, model_entries, run_qemu

from testbed.block.layer import BlockLayer
from testbed.errors import BlockError
from testbed.pytest_plugin import require

pytestmark = [pytest.mark.stock_qemu, pytest.mark.slow]

DEV = ["-device", "virtio-blk-pci,drive=drive0"]
CHAIN = "qemu-img create -q -f raw base.raw 4M && qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2"
QUIT: list[tuple[str, dict[str, Any] | None]] = [("quit", None)]


@dataclass(frozen=True, kw_only=True)
class Scenario:
    name: str
    setup: str
    qemu: list[str]
    model: Callable[[BlockLayer, str], None]
    qmp: list[tuple[str, dict[str, Any] | None]] = field(default_factory=lambda: list(QUIT))
    machine: str = "none"


def _snap(d: str, **kw: Any) -> tuple[str, dict[str, Any]]:
    return (
        "blockdev-snapshot-sync",
        {"device": "drive0", "snapshot-file": f"{d}/snap.qcow2", "format": "qcow2", **kw},
    )


def _expect_error(fn: Callable[[], object]) -> None:
    with pytest.raises((OSError, BlockError)):
        fn()


def _drive(file: str, fmt: str | None = None, **kw: Any) -> Callable[[BlockLayer, str], None]:
    def run(layer: BlockLayer, d: str) -> None:
        layer.drive_add(filename=f"{d}/{file}", fmt=fmt, **kw)

    return run


def _then(*steps: Callable[[BlockLayer, str], None]) -> Callable[[BlockLayer, str], None]:
    def run(layer: BlockLayer, d: str) -> None:
        for step in steps:
            step(layer, d)

    return run


def _device(layer: BlockLayer, d: str) -> None:
    layer.attach_device("drive0")


def _quit(layer: BlockLayer, d: str) -> None:
    layer.quit()


def _model_snap(mode: str = "absolute-paths") -> Callable[[BlockLayer, str], None]:
    def run(layer: BlockLayer, d: str) -> None:
        layer.blockdev_snapshot_sync("drive0", f"{d}/snap.qcow2", "qcow2", mode)

    return run


def _hmp_snap(layer: BlockLayer, d: str) -> None:
    layer.hmp_snapshot_blkdev("drive0", f"{d}/snap.qcow2")


def _blockdev(driver: str, file: str, **extra: Any) -> Callable[[BlockLayer, str], None]:
    def run(layer: BlockLayer, d: str) -> None:
        layer.blockdev_add(
            {
                "driver": driver,
                "node-name": "drive0",
                "file": {"driver": "file", "filename": f"{d}/{file}"},
                **extra,
            }
        )

    return run


def _fails(step: Callable[[BlockLayer, str], None]) -> Callable[[BlockLayer, str], None]:
    def run(layer: BlockLayer, d: str) -> None:
        _expect_error(lambda: step(layer, d))

    return run


VMDK_FLAT = "qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentFlat v.vmdk 3G"
VMDK_SPARSE = "qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentSparse v.vmdk 3G"
LOOP = (
    CHAIN + " && qemu-img create -q -f qcow2 l1.qcow2 4M && qemu-img create -q -f qcow2 "
    "-b l1.qcow2 -F qcow2 l2.qcow2 && qemu-img rebase -u -b l2.qcow2 -F qcow2 l1.qcow2"
)

SCENARIOS = [
    Scenario(
        name="drive-raw",
        setup=CHAIN,
        qemu=["-drive", "file={D}/base.raw,format=raw,if=none,id=drive0"],
        model=_then(_drive("base.raw", "raw"), _quit),
    ),
    Scenario(
        name="drive-raw-probed-device",
        setup=CHAIN,
        machine="pc",
        qemu=["-drive", "file={D}/base.raw,if=none,id=drive0", *DEV],
        model=_then(_drive("base.raw"), _device, _quit),
    ),
    Scenario(
        name="drive-qcow2-chain",
        setup=CHAIN,
        qemu=["-drive", "file={D}/top.qcow2,if=none,id=drive0"],
        model=_then(_drive("top.qcow2"), _quit),
    ),
    Scenario(
        name="drive-qcow2-device",
        setup=CHAIN,
        machine="pc",
        qemu=["-drive", "file={D}/top.qcow2,format=qcow2,if=none,id=drive0", *DEV],
        model=_then(_drive("top.qcow2", "qcow2"), _device, _quit),
    ),
    Scenario(
        name="drive-read-only",
        setup=CHAIN,
        machine="pc",
        qemu=["-drive", "file={D}/top.qcow2,if=none,id=drive0,read-only=on", *DEV],
        model=_then(_drive("top.qcow2", read_only=True), _device, _quit),
    ),
    Scenario(
        name="drive-cache-direct",
        setup=CHAIN,
        machine="pc",
        qemu=["-drive", "file={D}/top.qcow2,if=none,id=drive0,cache.direct=on", *DEV],
        model=_then(_drive("top.qcow2", cache_direct=True), _device, _quit),
    ),
    Scenario(
        name="blockdev-qcow2",
        setup=CHAIN,
        qemu=[
            "-blockdev",
            "driver=qcow2,node-name=drive0,file.driver=file,file.filename={D}/top.qcow2",
        ],
        model=_then(_blockdev("qcow2", "top.qcow2"), _quit),
    ),
    Scenario(
        name="blockdev-read-only",
        setup=CHAIN,
        qemu=[
            "-blockdev",
            "driver=qcow2,node-name=drive0,read-only=on,file.driver=file,file.filename={D}/top.qcow2",
        ],
        model=_then(_blockdev("qcow2", "top.qcow2", **{"read-only": True}), _quit),
    ),
    Scenario(
        name="blockdev-raw-direct",
        setup=CHAIN,
        qemu=[
            "-blockdev",
            "driver=raw,node-name=drive0,cache.direct=on,file.driver=file,file.filename={D}/base.raw",
        ],
        model=_then(_blockdev("raw", "base.raw", cache={"direct": True}), _quit),
    ),
    Scenario(
        name="hotplug-add-del",
        setup=CHAIN,
        qemu=[],
        qmp=[
            (
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": "drive0",
                    "file": {"driver": "file", "filename": "{D}/top.qcow2"},
                },
            ),
            ("blockdev-del", {"node-name": "drive0"}),
            *QUIT,
        ],
        model=_then(
            _blockdev("qcow2", "top.qcow2"), lambda layer, d: layer.blockdev_del("drive0"), _quit
        ),
    ),
    Scenario(
        name="snapshot-qmp",
        setup=CHAIN,
        machine="pc",
        qemu=["-drive", "file={D}/top.qcow2,if=none,id=drive0", *DEV],
        qmp=[_snap("{D}"), *QUIT],
        model=_then(_drive("top.qcow2"), _device, _model_snap(), _quit),
    ),
    Scenario(
        name="snapshot-hmp",
        setup=CHAIN,
        machine="pc",
        qemu=["-drive", "file={D}/top.qcow2,if=none,id=drive0", *DEV],
        qmp=[
            ("human-monitor-command", {"command-line": "snapshot_blkdev drive0 {D}/snap.qcow2"}),
            *QUIT,
        ],
        model=_then(_drive("top.qcow2"), _device, _hmp_snap, _quit),
    ),
    Scenario(
        name="snapshot-existing",
        machine="pc",
        setup=CHAIN + " && qemu-img create -q -f qcow2 -b top.qcow2 -F qcow2 snap.qcow2",
        qemu=["-drive", "file={D}/top.qcow2,if=none,id=drive0", *DEV],
        qmp=[_snap("{D}", mode="existing"), *QUIT],
        model=_then(_drive("top.qcow2"), _device, _model_snap("existing"), _quit),
    ),
    Scenario(
        name="snapshot-raw-base",
        setup=CHAIN,
        machine="pc",
        qemu=["-drive", "file={D}/base.raw,format=raw,if=none,id=drive0", *DEV],
        qmp=[_snap("{D}"), *QUIT],
        model=_then(_drive("base.raw", "raw"), _device, _model_snap(), _quit),
    ),
    Scenario(
        name="snapshot-read-only-drive",
        setup=CHAIN,
        qemu=["-drive", "file={D}/top.qcow2,if=none,id=drive0,read-only=on"],
        qmp=[_snap("{D}"), *QUIT],
        model=_then(_drive("top.qcow2", read_only=True), _model_snap(), _quit),
    ),
    Scenario(
        name="snapshot-blockdev",
        setup=CHAIN,
        qemu=[
            "-blockdev",
            "driver=qcow2,node-name=drive0,file.driver=file,file.filename={D}/top.qcow2",
        ],
        qmp=[
            (
                "blockdev-snapshot-sync",
                {
                    "node-name": "drive0",
                    "snapshot-node-name": "snap0",
                    "snapshot-file": "{D}/snap.qcow2",
                },
            ),
            *QUIT,
        ],
        model=_then(
            _blockdev("qcow2", "top.qcow2"),
            lambda layer, d: layer.blockdev_snapshot_sync(
                node_name="drive0", snapshot_node_name="snap0", snapshot_file=f"{d}/snap.qcow2"
            ),
            _quit,
        ),
    ),
    Scenario(
        name="chain-relative-subdir",
        machine="pc",
        setup=CHAIN
        + " && mkdir sub && qemu-img create -q -f qcow2 -b ../top.qcow2 -F qcow2 sub/c.qcow2",
        qemu=["-drive", "file={D}/sub/c.qcow2,if=none,id=drive0", *DEV],
        model=_then(_drive("sub/c.qcow2"), _device, _quit),
    ),
    Scenario(
        name="missing-image",
        setup=CHAIN,
        qemu=["-drive", "file={D}/nope.qcow2,if=none,id=drive0"],
        qmp=[],
        model=_fails(_drive("nope.qcow2")),
    ),
    Scenario(
        name="missing-backing",
        setup=CHAIN + " && rm base.raw",
        qemu=["-drive", "file={D}/top.qcow2,if=none,id=drive0"],
        qmp=[],
        model=_fails(_drive("top.qcow2")),
    ),
    Scenario(
        name="backing-loop",
        setup=LOOP,
        qemu=["-drive", "file={D}/l1.qcow2,if=none,id=drive0"],
        qmp=[],
        model=_fails(_drive("l1.qcow2")),
    ),
    Scenario(
        name="vmdk-flat-device-snapshot",
        setup=VMDK_FLAT,
        machine="pc",
        qemu=["-drive", "file={D}/v.vmdk,if=none,id=drive0", *DEV],
        qmp=[_snap("{D}"), *QUIT],
        model=_then(_drive("v.vmdk"), _device, _model_snap(), _quit),
    ),
    Scenario(
        name="vmdk-sparse",
        setup=VMDK_SPARSE,
        qemu=["-drive", "file={D}/v.vmdk,if=none,id=drive0"],
        model=_then(_drive("v.vmdk"), _quit),
    ),
    Scenario(
        name="vmdk-sparse-blockdev",
        setup=VMDK_SPARSE,
        qemu=[
            "-blockdev",
            "driver=vmdk,node-name=drive0,file.driver=file,file.filename={D}/v.vmdk",
        ],
        model=_then(_blockdev("vmdk", "v.vmdk"), _quit),
    ),
]


def _subst(value: Any, d: str) -> Any:
    if isinstance(value, str):
        return value.replace("{D}", d)
    if isinstance(value, dict):
        return {k: _subst(v, d) for k, v in value.items()}
    if isinstance(value, list):
        return [_subst(v, d) for v in value]
    if isinstance(value, tuple):
        return tuple(_subst(v, d) for v in value)
    return value


def _make(tmp: Path, setup: str) -> str:
    tmp.mkdir()
    subprocess.run(["bash", "-ec", setup], cwd=tmp, check=True)
    return str(tmp)


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda s: s.name)
def test_model_trace_equals_stock_qemu(sc: Scenario, tmp_path: Path) -> None:
    require(available(), "/usr/bin/qemu-system-x86_64 and strace")
    d_qemu = _make(tmp_path / "q", sc.setup)
    d_model = _make(tmp_path / "m", sc.setup)
    stock, replies, stderr = run_qemu(
        _subst(sc.qemu, d_qemu), _subst(sc.qmp, d_qemu), d_qemu, machine=sc.machine
    )
    assert stock, f"strace saw no image opens; QEMU said: {stderr}"
    layer = BlockLayer()
    sc.model(layer, d_model)
    layer.quit()
    assert model_entries(layer.trace, d_model) == stock, (replies, stderr)
