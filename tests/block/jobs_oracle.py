"""Test helper: one scenario (command line + steps) on stock QEMU under strace and on the model.

A step is ``("qmp", COMMAND, ARGS)``, ``("hmp", LINE)`` or ``("wait",
EVENT, JOB)``; ``$D`` in any string is the scenario's image directory.
Both sides end with ``quit``.  The traces come back normalised the way
``testbed compare`` normalises them (``testbed.compare.normalise``), as
lines (``open base.raw O_RDWR -> ok``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testbed.block.layer import BlockLayer
from testbed.block.monitor import ModelMachine
from testbed.compare.normalise import RawOpen, normalise, parse_strace
from testbed.compare.runners.stock import strace_prefix
from testbed.compare.trace import lines
from testbed.errors import TestbedError
from testbed.qemu import STOCK_QEMU, Machine, MachineConfig, QMPCommandError

Step = tuple[Any, ...]
#: A chain of three: base.raw <- mid.qcow2 <- top.qcow2, each layer with its own bytes.
CHAIN3 = (
    "qemu-img create -q -f raw base.raw 4M",
    "qemu-io -f raw -c 'write -q -P 0x61 0 1M' base.raw",
    "qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2",
    "qemu-io -f qcow2 -c 'write -q -P 0x62 1M 1M' mid.qcow2",
    "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2",
    "qemu-io -f qcow2 -c 'write -q -P 0x63 2M 1M' top.qcow2",
)


def make_dir(root: Path, recipe: Sequence[str]) -> None:
    if root.exists():
        shutil.rmtree(root)
    (root / "tmp").mkdir(parents=True)
    for cmd in recipe:
        subprocess.run(cmd, shell=True, check=True, cwd=root, timeout=60)


def _sub(value: Any, d: str) -> Any:
    return json.loads(json.dumps(value).replace("$D", d))


def run_stock(
    root: Path, args: Sequence[str], steps: Sequence[Step], *, machine: str
) -> tuple[list[str], list[str]]:
    """(normalised opens, outcome per step) of Debian's QEMU under strace."""
    d = str(root)
    out = root.parent / f"{root.name}.strace"
    config = MachineConfig(
        binary=STOCK_QEMU,
        machine=machine,
        args=tuple(_sub(list(args), d)),
        wrapper=strace_prefix(str(out)),
        log_path=root.parent / f"{root.name}.log",
        env=(("TMPDIR", f"{d}/tmp"),),
    )
    outcomes: list[str] = []
    with Machine(config) as vm:
        for step in _sub([list(s) for s in steps], d):
            try:
                if step[0] == "qmp":
                    vm.qmp(step[1], **step[2])
                elif step[0] == "hmp":
                    vm.hmp(step[1])
                else:
                    _wait(vm, step[1], step[2])
                outcomes.append("ok")
            except (QMPCommandError, TestbedError):
                outcomes.append("failed")
    trace = normalise(parse_strace(out.read_text()), root)
    return [ln for ln in lines(trace) if "O_DIRECTORY" not in ln], outcomes


def _wait(vm: Machine, event: str, job: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in vm.events():
            if e.get("event") == event and e.get("data", {}).get("device") == job:
                return
        time.sleep(0.02)
    raise TestbedError(f"{event} of job {job!r} did not come within {timeout}s")


def run_model(
    root: Path, args: Sequence[str], steps: Sequence[Step]
) -> tuple[list[str], list[str]]:
    """(normalised opens, outcome per step) of the model (plain ``os.open``)."""
    d = str(root)
    layer = BlockLayer()
    m = ModelMachine(layer, tmpdir=f"{d}/tmp")
    m.launch(_sub(list(args), d))
    outcomes: list[str] = []
    for step in _sub([list(s) for s in steps], d):
        try:
            if step[0] == "qmp":
                m.qmp(step[1], **step[2])
            elif step[0] == "hmp":
                m.hmp(step[1])
            else:
                m.wait(step[1], job=step[2])
            outcomes.append("ok")
        except (TestbedError, OSError):
            outcomes.append("failed")
    m.quit()
    raws = [RawOpen(path=e.path, flags=e.flags, mode=e.mode, result=e.result) for e in layer.trace]
    return lines(normalise(raws, root)), outcomes
