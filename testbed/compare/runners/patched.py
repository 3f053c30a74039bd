"""Oracle 1: the patched QEMU with ``-open-hook-fd``; the broker's audit log is the trace."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from testbed.broker import read_audit
from testbed.compare.normalise import from_audit, normalise
from testbed.compare.runners.common import OracleResult, Setup, run_qemu_scenario
from testbed.qemu import Machine, MachineConfig
from testbed.qemu.binaries import is_runnable


@functools.lru_cache(maxsize=4)
def block_formats(binary: Path) -> frozenset[str]:
    """The block drivers ``binary`` was built with (``-drive format=help``)."""
    done = subprocess.run(
        [str(binary), "-drive", "format=help"], capture_output=True, text=True, timeout=60
    )
    first = done.stdout.splitlines()[0] if done.stdout else ""
    return frozenset(first.partition(":")[2].split())


def run(setup: Setup) -> OracleResult:
    result = OracleResult()
    binary = setup.binaries.patched
    if not is_runnable(binary):
        result.skipped = f"patched QEMU {binary} is missing (run `make qemu`)"
        return result
    if "vvfat-rw" in setup.scenario.tags and "qcow" not in block_formats(binary):
        # vvfat rw formats its write target as qcow (version 1)
        result.skipped = (
            f"{binary} has no qcow driver, which vvfat rw needs "
            "(build-qemu.sh: configure --enable-qcow1)"
        )
        return result
    audit = setup.logs / "patched-audit.jsonl"
    audit.unlink(missing_ok=True)
    log = setup.logs / "patched-qemu.log"
    log.unlink(missing_ok=True)
    config = MachineConfig(
        binary=binary,
        hook=True,
        machine=setup.scenario.machine,
        args=setup.args(),
        env=setup.env(),
        log_path=log,
    )
    vm = Machine(config)
    vm.start_broker(setup.policy(), audit_path=audit)
    run_qemu_scenario(vm, setup, result)
    # QEMU runs in our working directory and the hook joins relative names to it
    result.trace = normalise(from_audit(read_audit(audit)), setup.root, qemu_cwd=os.getcwd())
    result.log = str(log)
    result.extra["audit"] = str(audit)
    return result
