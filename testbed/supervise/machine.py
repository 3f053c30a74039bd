"""A supervised QEMU for :class:`testbed.qemu.Machine`: the supervisor as its ``wrapper``.

Chosen over a Machine option so that testbed/qemu needs no change: the
machine runs ``python -m testbed supervise ... -- stdbuf ... qemu ...`` and
talks QMP to QEMU over its socket pair as always (the supervisor passes
every inherited descriptor through).  The audit log is the file named by
``audit``::

    config = supervised_config(MachineConfig(args=...), policy, workdir=tmp,
                               landlock=True, audit=tmp / "audit.jsonl")
    with Machine(config) as vm:
        vm.qmp("blockdev-snapshot-sync", ...)
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from testbed.broker import Policy
from testbed.broker.policy import GRANT_OPTIONS
from testbed.qemu import MachineConfig


def policy_toml(policy: Policy) -> str:
    """``policy`` in the broker's TOML policy format (what ``--policy`` reads)."""
    lines = [
        f"refuse_errno = {policy.refuse_errno}",
        f"create_mode_mask = {policy.create_mode_mask}",
    ]
    for g in policy.grants:
        lines += [
            "",
            "[[grant]]",
            f"path = {json.dumps(g.path)}",
            f'access = "{g.access.label}"',
            *(f"{rule} = {str(getattr(g, rule)).lower()}" for rule in GRANT_OPTIONS),
        ]
    return "\n".join(lines) + "\n"


def supervise_wrapper(
    policy: Policy,
    *,
    workdir: Path,
    landlock: bool = False,
    landlock_only: bool = False,
    audit: Path | None = None,
    exec_paths: tuple[str | Path, ...] = (),
    profile: str | Path | None = None,
) -> tuple[str, ...]:
    """The words that run the rest of a command line under ``testbed supervise``."""
    workdir.mkdir(parents=True, exist_ok=True)
    policy_file = workdir / "supervise-policy.toml"
    policy_file.write_text(policy_toml(policy))
    words = [sys.executable, "-m", "testbed", "supervise", "--policy", str(policy_file)]
    if landlock:
        words.append("--landlock")
    if landlock_only:
        words.append("--landlock-only")
    if audit is not None:
        words += ["--audit", str(audit)]
    if profile is not None:
        words += ["--system-profile", str(profile)]
    for path in exec_paths:
        words += ["--allow-exec", str(path)]
    return (*words, "--")


def supervised_config(
    config: MachineConfig,
    policy: Policy,
    *,
    workdir: Path,
    landlock: bool = False,
    landlock_only: bool = False,
    audit: Path | None = None,
) -> MachineConfig:
    """``config`` with QEMU run under the supervisor (before any wrapper it had)."""
    wrapper = supervise_wrapper(
        policy,
        workdir=workdir,
        landlock=landlock,
        landlock_only=landlock_only,
        audit=audit,
        # stdbuf (line_buffered) execs QEMU: Landlock must let it
        exec_paths=(config.binary,),
    )
    return dataclasses.replace(config, wrapper=wrapper + config.wrapper)
