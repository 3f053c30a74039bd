"""What the runners share: images, the scenario directory, QEMU's command line and operations."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.broker import Policy
from testbed.compare.scenarios import OVERLAY, READ_SPAN, Scenario
from testbed.compare.trace import Open
from testbed.errors import TestbedError
from testbed.qemu import Machine, QMPCommandError

#: Node name (``-blockdev``, hotplug) or BlockBackend id (``-drive``) of the image.
DRIVE = "drive0"
#: Where QEMU's g_mkstemp puts temporary images.
TEMP_DIR = "/var/tmp"


class ScenarioSetupError(TestbedError):
    """A scenario cannot be prepared: image missing from the index, copy failed, ..."""


@dataclass(frozen=True, kw_only=True)
class ImageInfo:
    """One entry of ``build/images/index.json``."""

    name: str
    format: str
    subformat: str | None
    dir: Path
    main: Path  # absolute, inside ``dir``

    @property
    def main_rel(self) -> str:
        return str(self.main.relative_to(self.dir))


def load_index(path: Path) -> dict[str, ImageInfo]:
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ScenarioSetupError(f"no image index {path} (run `make images`)") from err
    except json.JSONDecodeError as err:
        raise ScenarioSetupError(f"image index {path} is not JSON: {err}") from err
    out = {}
    for e in entries:
        out[e["name"]] = ImageInfo(
            name=e["name"],
            format=e["format"],
            subformat=e.get("subformat"),
            dir=Path(e["dir"]),
            main=Path(e["main"]),
        )
    return out


@dataclass(frozen=True, kw_only=True)
class Setup:
    """A scenario ready to run for one oracle: ``root`` is a fresh copy of the image dir."""

    scenario: Scenario
    image: ImageInfo
    root: Path
    #: Where logs, strace output and audit files go (outside ``root``).
    logs: Path

    @property
    def main(self) -> Path:
        return self.root / self.image.main_rel

    @property
    def overlay(self) -> Path:
        return self.root / OVERLAY

    def filename(self, main: str | None = None) -> str:
        """The image's file name as QEMU is given it (``fat:...`` for vvfat)."""
        path = main if main is not None else str(self.main)
        if self.image.format == "vvfat":
            prefix = self.image.subformat or "fat:"
            return prefix + ("rw:" if self.scenario.vvfat_rw else "") + path
        return path

    def policy(self) -> Policy:
        grant = self.scenario.grant
        # vvfat rw makes its write target in /var/tmp (g_mkstemp, through the hook
        # with the series' extension patch): grant that, or vvfat rw cannot start
        temp = [TEMP_DIR] if self.scenario.vvfat_rw else []
        # vvfat scans its directory: with opendir() (stock) that is an open
        # the seccomp supervisor serves, and the broker hands out directory
        # fds only under a rule that allows them (docs/broker.md).
        dirs = self.image.format == "vvfat"
        if grant == "ro":
            return Policy.from_grants(ro=[self.root], create=temp, directories=dirs)
        if grant == "main":
            return Policy.from_grants(rw=[self.main], create=temp, directories=dirs)
        return Policy.from_grants(create=[self.root, *temp], directories=dirs)


def prepare(scenario: Scenario, image: ImageInfo, base: Path, oracle: str) -> Setup:
    """A fresh copy of ``image``'s directory under ``base/<scenario>/<oracle>``."""
    where = base.resolve() / scenario.name
    root = where / oracle
    logs = where / "logs"
    if root.exists():
        shutil.rmtree(root)
    logs.mkdir(parents=True, exist_ok=True)
    # cp keeps the images sparse (shutil would write every hole: 58 MB of
    # images became 1.2 GB of copies)
    done = subprocess.run(
        ["cp", "-a", "--sparse=always", f"{image.dir}/.", str(root)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise ScenarioSetupError(f"cannot copy image {image.name} to {root}: {done.stderr.strip()}")
    (root / ".recipe-hash").unlink(missing_ok=True)
    setup = Setup(scenario=scenario, image=image, root=root, logs=logs)
    if "snapshot-existing" in scenario.operations:
        # The overlay mode=existing expects: made beforehand, as libvirt would.
        size = subprocess.run(
            ["qemu-img", "info", "--output=json", "-f", image.format, str(setup.main)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if size.returncode != 0:
            raise ScenarioSetupError(f"qemu-img info {setup.main}: {size.stderr.strip()}")
        vsize = json.loads(size.stdout)["virtual-size"]
        made = subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                image.main_rel,
                "-F",
                image.format,
                str(setup.overlay),
                str(vsize),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if made.returncode != 0:
            raise ScenarioSetupError(f"qemu-img create {setup.overlay}: {made.stderr.strip()}")
    return setup


@dataclass(kw_only=True)
class OracleResult:
    """What one oracle did for a scenario."""

    trace: list[Open] = field(default_factory=list)
    #: (operation, "ok" or the error text), in order; "launch" first for QEMU.
    operations: list[tuple[str, str]] = field(default_factory=list)
    #: Set when the oracle could not run at all (missing binary, setup failed).
    skipped: str = ""
    seconds: float = 0.0
    log: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.skipped and all(res == "ok" for _, res in self.operations)

    @property
    def first_error(self) -> str:
        for op, res in self.operations:
            if res != "ok":
                return f"{op}: {res}"
        return self.skipped

    def to_json(self) -> dict[str, Any]:
        return {
            "trace": [o.to_json() for o in self.trace],
            "operations": [{"op": op, "result": res} for op, res in self.operations],
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "log": self.log,
            **self.extra,
        }


# -- QEMU ------------------------------------------------------------------------------


def machine_type(scenario: Scenario) -> str:
    return "pc" if scenario.attach == "drive-device" else "none"


def qemu_args(setup: Setup, main: str | None = None) -> tuple[str, ...]:
    """QEMU options attaching the scenario's image; ``main`` replaces its path (fd sets)."""
    sc = setup.scenario
    fmt = "raw" if setup.image.format == "vvfat" else setup.image.format
    opts = []
    if sc.read_only:
        opts.append("read-only=on")
    if sc.cache_direct:
        opts.append("cache.direct=on")
    if sc.attach in ("drive", "drive-device"):
        drive = [f"file={setup.filename(main)}", f"format={fmt}", "if=none", f"id={DRIVE}", *opts]
        args: list[str] = ["-drive", ",".join(drive)]
        if sc.attach == "drive-device":
            args += ["-S", "-device", f"virtio-blk-pci,drive={DRIVE}"]
        return tuple(args)
    if sc.attach == "blockdev":
        node = [
            f"driver={fmt}",
            f"node-name={DRIVE}",
            "file.driver=file",
            f"file.filename={setup.filename(main)}",
            *opts,
        ]
        return ("-blockdev", ",".join(node))
    return ()


def blockdev_add_args(setup: Setup, main: str | None = None) -> dict[str, Any]:
    sc = setup.scenario
    args: dict[str, Any] = {
        "driver": setup.image.format,
        "node-name": DRIVE,
        "file": {"driver": "file", "filename": setup.filename(main)},
    }
    if sc.read_only:
        args["read-only"] = True
    if sc.cache_direct:
        args["cache"] = {"direct": True}
    return args


def _device_words(setup: Setup) -> tuple[str, dict[str, str]]:
    """qemu-io's target and blockdev-snapshot-sync's selector for the image."""
    # HMP qemu-io takes a BlockBackend name or a node name in the same place
    if setup.scenario.attach in ("drive", "drive-device"):
        return DRIVE, {"device": DRIVE}
    return DRIVE, {"node-name": DRIVE, "snapshot-node-name": "snap0"}


def run_operation(
    vm: Machine,
    setup: Setup,
    op: str,
    *,
    overlay: str | None = None,
    add_args: dict[str, Any] | None = None,
) -> str:
    """Do ``op`` on a running QEMU; "ok" or the error's text (QEMU's own words)."""
    target, selector = _device_words(setup)
    snap = overlay if overlay is not None else str(setup.overlay)
    try:
        if op == "add":
            vm.qmp("blockdev-add", **(add_args or blockdev_add_args(setup)))
        elif op == "del":
            vm.qmp("blockdev-del", **{"node-name": DRIVE})
        elif op == "read":
            offset, length = READ_SPAN
            out = vm.qemu_io(target, f"read {offset} {length}")
            if "read " not in out or "error" in out.lower() or "failed" in out.lower():
                return f"qemu-io read: {out.strip()[-300:]}"
        elif op in ("snapshot-qmp", "snapshot-existing"):
            extra = {"mode": "existing"} if op == "snapshot-existing" else {}
            vm.qmp(
                "blockdev-snapshot-sync",
                **selector,
                **{"snapshot-file": snap, "format": "qcow2"},
                **extra,
            )
        elif op == "snapshot-hmp":
            out = vm.hmp(f"snapshot_blkdev {DRIVE} {snap} qcow2")
            if out.strip():
                return f"snapshot_blkdev: {out.strip()}"
        elif op == "quit":
            how = vm.shutdown()
            if how != "quit":
                return f"QEMU did not quit cleanly ({how})"
        else:
            raise ValueError(f"unknown operation {op!r}")
    except QMPCommandError as err:
        return f"{err.error_class}: {err.desc}"
    except TestbedError as err:
        return str(err).splitlines()[0]
    return "ok"


def run_qemu_scenario(vm: Machine, setup: Setup, result: OracleResult) -> None:
    """Launch ``vm``, do every operation, shut down; outcomes go into ``result``."""
    start = time.monotonic()
    try:
        vm.launch()
    except TestbedError as err:
        result.operations.append(("launch", _launch_error(err)))
        vm.shutdown()
        result.seconds = time.monotonic() - start
        return
    result.operations.append(("launch", "ok"))
    try:
        for op in setup.scenario.operations:
            result.operations.append((op, run_operation(vm, setup, op)))
    finally:
        vm.shutdown()
        result.seconds = time.monotonic() - start


def _launch_error(err: TestbedError) -> str:
    log = getattr(err, "log", "") or ""
    lines = [ln for ln in log.splitlines() if "qemu-system" in ln or "error" in ln.lower()]
    return (lines[-1].strip() if lines else str(err).splitlines()[0])[:400]


def remove_if_exists(path: Path) -> None:
    if path.exists():
        os.unlink(path)
