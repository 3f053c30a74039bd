"""Oracle 1: the patched QEMU with ``-open-hook-fd``; the broker's audit log is the trace.

A ``broker kill`` step stops the in-process broker (its socket closed, as
the kernel closes a SIGKILLed broker's); ``broker restart`` serves the
running QEMU with a new broker writing a second audit log (QMP ``getfd`` +
``open-hook-set``, patch 0007).  The audit logs of every broker, in order,
are the trace.
"""

from __future__ import annotations

import functools
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from testbed.broker import Broker, read_audit
from testbed.compare.normalise import from_audit, normalise
from testbed.compare.runners.qemu_run import run_qemu_scenario
from testbed.compare.runners.result import OracleResult
from testbed.compare.runners.setup import Setup
from testbed.qemu import Machine
from testbed.qemu.binaries import is_runnable


@functools.lru_cache(maxsize=4)
def block_formats(binary: Path) -> frozenset[str]:
    """The block drivers ``binary`` was built with (``-drive format=help``)."""
    done = subprocess.run(
        [str(binary), "-drive", "format=help"], capture_output=True, text=True, timeout=60
    )
    first = done.stdout.splitlines()[0] if done.stdout else ""
    return frozenset(first.partition(":")[2].split())


@dataclass(kw_only=True)
class _Brokers:
    """The patched QEMU's brokers, one audit log each (``broker`` steps)."""

    vm: Machine
    setup: Setup
    current: Broker
    audits: list[Path]
    down_errors: list[tuple[str, str]] = field(default_factory=list)

    def kill(self) -> None:
        self.current.stop()

    def restart(self) -> None:
        audit = self.setup.logs / f"patched-audit-{len(self.audits) + 1}.jsonl"
        audit.unlink(missing_ok=True)
        self.current = self.vm.reattach_broker(self.setup.policy(), audit_path=audit)
        self.audits.append(audit)


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
    config = setup.machine_config(binary, "patched", hook=True)
    vm = Machine(config)
    first = vm.start_broker(setup.policy(), audit_path=audit)
    brokers = _Brokers(vm=vm, setup=setup, current=first, audits=[audit])
    run_qemu_scenario(vm, setup, result, brokers=brokers)
    records = [r for path in brokers.audits for r in read_audit(path)]
    # QEMU runs in our working directory and the hook joins relative names to it
    result.trace = normalise(from_audit(records), setup.root, qemu_cwd=os.getcwd())
    result.log = str(config.log_path)
    result.extra["audit"] = str(audit)
    if len(brokers.audits) > 1:
        result.extra["audits"] = [str(a) for a in brokers.audits]
    if brokers.down_errors:
        result.extra["broker_down_errors"] = [list(e) for e in brokers.down_errors]
    return result
