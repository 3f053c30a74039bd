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

import json
from pathlib import Path

from testbed.compare.compare import (
    KnownDivergence,
    _drop_right,
    _is_opendir,
    _relative_refused,
    _until_refusal,
)
from testbed.compare.normalise import RawOpen, normalise
from testbed.compare.runners.common import (
    OracleResult,
    Setup,
    machine_type,
    qemu_args,
    run_qemu_scenario,
)
from testbed.errors import KernelFeatureError
from testbed.qemu import STOCK_QEMU, Machine, MachineConfig
from testbed.qemu.binaries import is_runnable
from testbed.supervise.landlock import abi_version
from testbed.supervise.machine import supervised_config
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
    if not is_runnable(STOCK_QEMU):
        result.skipped = f"Debian's QEMU {STOCK_QEMU} is missing"
        return result
    try:
        check_user_notification()
        abi_version()
    except KernelFeatureError as err:
        result.skipped = str(err)
        return result
    audit = setup.logs / "seccomp-audit.jsonl"
    audit.unlink(missing_ok=True)
    log = setup.logs / "seccomp-qemu.log"
    log.unlink(missing_ok=True)
    config = supervised_config(
        MachineConfig(
            binary=STOCK_QEMU,
            machine=machine_type(setup.scenario),
            args=qemu_args(setup),
            log_path=log,
        ),
        setup.policy(),
        workdir=setup.logs / "seccomp",
        landlock=True,
        audit=audit,
    )
    run_qemu_scenario(Machine(config), setup, result)
    result.trace = normalise(raw_opens(audit), setup.root)
    result.log = str(log)
    result.extra["audit"] = str(audit)
    return result


#: The expected differences from stock QEMU under strace (pair ("seccomp",
#: "stock")) and from the patched QEMU's hook (pair ("patched", "seccomp")):
#: to go into compare.KNOWN_DIVERGENCES, with those pairs in PAIRS, when this
#: oracle joins the scenario status.
KNOWN_DIVERGENCES = (
    KnownDivergence(
        key="refusal",
        pair=("seccomp", "stock"),
        tag="refusal",
        reason=(
            "stock QEMU has nobody to refuse an open: the traces are the same up to the "
            "open the supervisor refused (EACCES) and differ afterwards."
        ),
        rewrite=_until_refusal,
    ),
    KnownDivergence(
        key="relative-name",
        pair=("seccomp", "stock"),
        tag="",
        reason=(
            "QEMU sometimes opens a name relative to its working directory (the host_cdrom "
            "probe of a whole 'fat:...' name; a qcow2 external data file named in the "
            "header). The supervisor resolves it against QEMU's cwd, which lies outside the "
            "grants, and refuses it (EACCES); stock QEMU gets the kernel's answer (ENOENT). "
            "Same request, other errno."
        ),
        rewrite=_relative_refused,
    ),
    KnownDivergence(
        key="opendir",
        pair=("patched", "seccomp"),
        tag="",
        reason=(
            "glibc's opendir() opens each directory O_RDONLY|O_NONBLOCK|O_DIRECTORY "
            "(vvfat's directory scan): the supervisor serves every open and sees these, "
            "the hook in qemu_open does not."
        ),
        rewrite=_drop_right(_is_opendir),
    ),
)
