"""Oracle: Debian's QEMU, unmodified, with its opens served by ``testbed supervise``.

The supervisor's audit log is the trace, as the broker's is for the patched
QEMU.  It sees every open QEMU makes (vvfat's directory scans included,
which the hook in qemu_open does not), so its normalised trace should equal
stock QEMU's under strace except where the policy refuses an open (the
``refusal`` scenarios: stock QEMU has nobody to refuse it).  QEMU runs
under Landlock too, so every image open in the trace can only have come
from the supervisor (no scenario writes through vvfat rw, whose
mkdir/rename/unlink Landlock would deny: those are not opens).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from testbed.compare.compare import KNOWN_DIVERGENCES as ALL_DIVERGENCES
from testbed.compare.normalise import RawOpen, normalise
from testbed.compare.runners.qemu_run import run_qemu_scenario
from testbed.compare.runners.result import OracleResult
from testbed.compare.runners.setup import Setup
from testbed.errors import KernelFeatureError
from testbed.qemu import Machine
from testbed.qemu.binaries import is_runnable
from testbed.supervise.landlock import abi_version
from testbed.supervise.machine import supervise_wrapper
from testbed.supervise.seccomp import check_user_notification
from testbed.supervise.target import AT_FDCWD


def raw_opens(audit: Path) -> list[RawOpen]:
    """The audit log's opens with the names as QEMU gave them (relative ones too,
    and the directory fd they are relative to), as strace shows them."""
    if not audit.exists():
        return []
    out = []
    with open(audit, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            data = json.loads(line)
            dirfd = int(data.get("dirfd", AT_FDCWD))
            out.append(
                RawOpen(
                    path=data["path"],
                    flags=data["flags"],
                    mode=data["mode"],
                    result=data["result"],
                    dirfd="AT_FDCWD" if dirfd == AT_FDCWD else str(dirfd),
                )
            )
    return out


def run(setup: Setup) -> OracleResult:
    result = OracleResult()
    binary = setup.binaries.stock
    if not is_runnable(binary):
        result.skipped = f"stock QEMU {binary} is missing"
        return result
    try:
        check_user_notification()
        abi_version()
    except KernelFeatureError as err:
        result.skipped = str(err)
        return result
    audit = setup.logs / "seccomp-audit.jsonl"
    audit.unlink(missing_ok=True)
    config = setup.machine_config(binary, "seccomp")
    workdir = setup.logs / "seccomp"
    wrapper = supervise_wrapper(
        setup.policy(),
        workdir=workdir,
        landlock=True,
        audit=audit,
        # stdbuf (line_buffered) execs QEMU: Landlock must let it
        # (and the supervisor grants its bin/../etc/qemu and share/qemu: command_prefix)
        exec_paths=(binary,),
    )
    config = dataclasses.replace(config, wrapper=wrapper + config.wrapper)
    run_qemu_scenario(Machine(config), setup, result)
    result.trace = normalise(raw_opens(audit), setup.root)
    result.log = str(config.log_path)
    result.extra["audit"] = str(audit)
    return result


#: The known divergences of the pairs this oracle is in (they live in
#: compare.KNOWN_DIVERGENCES with every other pair's).
KNOWN_DIVERGENCES = tuple(d for d in ALL_DIVERGENCES if "seccomp" in d.pair)
