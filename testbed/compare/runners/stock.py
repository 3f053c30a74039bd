"""Oracle 2: Debian's QEMU under strace; its normalised opens are the trace."""

from __future__ import annotations

import shutil

from testbed.compare.normalise import normalise, parse_strace
from testbed.compare.runners.qemu_run import run_qemu_scenario
from testbed.compare.runners.result import OracleResult
from testbed.compare.runners.setup import Setup
from testbed.qemu import Machine
from testbed.qemu.binaries import is_runnable


def strace_prefix(output: str) -> tuple[str, ...]:
    # -s: paths must not be cut; signal=none, -qq: only the calls we parse
    return (
        "strace",
        "-f",
        "-qq",
        "-s",
        "4096",
        "-e",
        "trace=openat,open",
        "-e",
        "signal=none",
        "-o",
        output,
    )


def run(setup: Setup) -> OracleResult:
    result = OracleResult()
    binary = setup.binaries.stock
    if not is_runnable(binary):
        result.skipped = f"Debian's QEMU {binary} is missing"
        return result
    if shutil.which("strace") is None:
        result.skipped = "strace is not installed"
        return result
    out = setup.logs / "stock-strace.txt"
    out.unlink(missing_ok=True)
    config = setup.machine_config(binary, "stock", wrapper=strace_prefix(str(out)))
    run_qemu_scenario(Machine(config), setup, result)
    text = out.read_text(errors="replace") if out.exists() else ""
    result.trace = normalise(parse_strace(text), setup.root)
    result.log = str(config.log_path)
    result.extra["strace"] = str(out)
    return result
