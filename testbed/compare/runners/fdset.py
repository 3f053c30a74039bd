"""Oracle 3: upstream's fd sets, with the testbed playing libvirt.

Before QEMU needs them, the files libvirt knows about are opened here and
handed over, one fd set per file, and QEMU is only ever told
``/dev/fdset/N``.  Like libvirt with ``-blockdev``, the testbed reads the
image's backing chain and external data file itself (``qemu-img info
--backing-chain``) and spells the whole chain out in the node options
(``backing``, ``data-file``), so that QEMU does not resolve a stored
relative name under ``/dev/fdset/``.  The overlay of a snapshot is created
empty beforehand, as libvirt does.  What cannot be spelled out stays a
name: vmdk extents and vvfat's host files.

Every file gets an ``O_RDONLY`` member; the image QEMU writes (the top, the
data file, the overlay) also an ``O_RDWR`` one, unless the grant is
read-only; with a grant of the main file only, only that file is passed.
Command-line drives are opened before QMP exists, so their fds
come with ``-add-fd`` (inherited); hotplugged images and overlays with QMP
``add-fd`` (SCM_RIGHTS on the QMP socket).  The result is whether every
operation worked, and QEMU's error if not.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any

from testbed.compare.runners.common import (
    DRIVE,
    OracleResult,
    ScenarioSetupError,
    Setup,
    machine_type,
    run_operation,
)
from testbed.errors import TestbedError
from testbed.qemu import STOCK_QEMU, Machine, MachineConfig
from testbed.qemu.binaries import is_runnable

OVERLAY_SET = 1
FIRST_CHAIN_SET = 10


@dataclass(frozen=True, kw_only=True)
class Member:
    path: str
    fdset: int
    writable: bool


@dataclass(frozen=True, kw_only=True)
class Layer:
    """One image of the chain (top first), with its fd set and data file's."""

    path: str
    format: str
    fdset: int
    data_file_set: int | None = None


def backing_chain(setup: Setup) -> tuple[list[Layer], list[Member]]:
    """The chain as libvirt would find it, and the files to pass."""
    if setup.image.format == "vvfat":
        return [Layer(path=str(setup.main), format="raw", fdset=FIRST_CHAIN_SET)], []
    done = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(setup.main)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(setup.main),
    )
    if done.returncode != 0:
        raise ScenarioSetupError(
            f"qemu-img info --backing-chain {setup.main}: {done.stderr.strip()}"
        )
    writable = setup.scenario.grant != "ro" and not setup.scenario.read_only
    layers, members = [], []
    next_set = FIRST_CHAIN_SET
    for i, info in enumerate(json.loads(done.stdout)):
        path = os.path.normpath(os.path.join(os.path.dirname(setup.main), info["filename"]))
        data_set = None
        data_file = info.get("format-specific", {}).get("data", {}).get("data-file")
        if data_file:
            data_set = next_set + 1
            members.append(
                Member(
                    path=os.path.join(os.path.dirname(path), data_file),
                    fdset=data_set,
                    writable=writable and i == 0,
                )
            )
        layers.append(
            Layer(path=path, format=info["format"], fdset=next_set, data_file_set=data_set)
        )
        members.append(Member(path=path, fdset=next_set, writable=writable and i == 0))
        next_set += 2
    return layers, members


def _file(fdset: int) -> dict[str, Any]:
    return {"driver": "file", "filename": f"/dev/fdset/{fdset}"}


def node_options(setup: Setup, layers: list[Layer], i: int = 0) -> dict[str, Any]:
    """The chain from ``layers[i]`` down as nested blockdev options."""
    layer = layers[i]
    opts: dict[str, Any] = {"driver": layer.format, "file": _file(layer.fdset)}
    if layer.data_file_set is not None:
        opts["data-file"] = _file(layer.data_file_set)
    if i + 1 < len(layers):
        opts["backing"] = node_options(setup, layers, i + 1)
    return opts


def dotted(opts: dict[str, Any], prefix: str = "") -> list[str]:
    """``-drive`` syntax for nested options: ``backing.file.filename=...``."""
    out = []
    for key, value in opts.items():
        if isinstance(value, dict):
            out += dotted(value, f"{prefix}{key}.")
        elif isinstance(value, bool):
            out.append(f"{prefix}{key}={'on' if value else 'off'}")
        else:
            out.append(f"{prefix}{key}={value}")
    return out


def attach(setup: Setup, layers: list[Layer]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The command-line options and the ``blockdev-add`` arguments for the scenario."""
    sc = setup.scenario
    vvfat_name = setup.filename(f"/dev/fdset/{FIRST_CHAIN_SET}")
    top = node_options(setup, layers)
    extra: dict[str, Any] = {}
    if sc.read_only:
        extra["read-only"] = True
    if sc.cache_direct:
        extra["cache"] = {"direct": True}
    if sc.attach in ("drive", "drive-device"):
        words = ["if=none", f"id={DRIVE}", *dotted({**top, **extra})]
        if setup.image.format == "vvfat":
            # vvfat takes a directory name: the closest an fd set can come
            words = ["if=none", f"id={DRIVE}", "format=raw", f"file={vvfat_name}", *dotted(extra)]
        args: tuple[str, ...] = ("-drive", ",".join(words))
        if sc.attach == "drive-device":
            args += ("-S", "-device", f"virtio-blk-pci,drive={DRIVE}")
        return args, {}
    node = {**top, "node-name": DRIVE, **extra}
    if sc.attach == "blockdev":
        return ("-blockdev", json.dumps(node)), {}
    return (), node


def _add_fd(vm: Machine, fd: int, fdset: int) -> None:
    vm.add_fd(fd, fdset_id=fdset)


def _open_member(m: Member, *, inheritable: bool) -> list[int]:
    if os.path.isdir(m.path):
        modes = [os.O_RDONLY | os.O_DIRECTORY]
    else:
        modes = [os.O_RDONLY, os.O_RDWR] if m.writable else [os.O_RDONLY]
    fds = []
    for flags in modes:
        fd = os.open(m.path, flags | (0 if inheritable else os.O_CLOEXEC))
        if inheritable:
            os.set_inheritable(fd, True)
        fds.append(fd)
    return fds


def run(setup: Setup) -> OracleResult:
    result = OracleResult()
    if not is_runnable(STOCK_QEMU):
        result.skipped = f"Debian's QEMU {STOCK_QEMU} is missing"
        return result
    sc = setup.scenario
    layers, members = backing_chain(setup)
    if setup.image.format == "vvfat":
        members = [Member(path=str(setup.main), fdset=FIRST_CHAIN_SET, writable=False)]
    if sc.grant == "main":
        # libvirt refuses by not passing: only the granted file gets an fd set
        members = [m for m in members if m.path == str(setup.main)]
    late: list[Member] = []
    if sc.snapshots:
        if "snapshot-existing" not in sc.operations:
            setup.overlay.touch()
        late.append(Member(path=str(setup.overlay), fdset=OVERLAY_SET, writable=True))
    args, add_args = attach(setup, layers)
    if sc.attach == "hotplug":
        late = members + late
        members = []
    result.extra["chain"] = [layer.path for layer in layers]
    log = setup.logs / "fdset-qemu.log"
    log.unlink(missing_ok=True)
    fds: list[int] = []
    try:
        extra: list[str] = []
        for m in members:
            for fd in _open_member(m, inheritable=True):
                fds.append(fd)
                extra += ["-add-fd", f"fd={fd},set={m.fdset}"]
        config = MachineConfig(
            binary=STOCK_QEMU,
            machine=machine_type(sc),
            args=(*extra, *args),
            pass_fds=tuple(fds),
            log_path=log,
        )
        vm = Machine(config)
        try:
            vm.launch()
        except TestbedError as err:
            result.operations.append(("launch", _first_line(vm, err)))
            vm.shutdown()
            return result
        result.operations.append(("launch", "ok"))
        try:
            for m in late:
                for fd in _open_member(m, inheritable=False):
                    fds.append(fd)
                    _add_fd(vm, fd, m.fdset)
            for op in sc.operations:
                result.operations.append(
                    (
                        op,
                        run_operation(
                            vm, setup, op, overlay=f"/dev/fdset/{OVERLAY_SET}", add_args=add_args
                        ),
                    )
                )
        finally:
            vm.shutdown()
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    result.log = str(log)
    return result


def _first_line(vm: Machine, err: TestbedError) -> str:
    for line in vm.read_log().splitlines():
        if "qemu-system" in line:
            return line.strip()[:400]
    return str(err).splitlines()[0]
