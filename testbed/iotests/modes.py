"""The ways the harness runs qemu-system under the suite, and their wrappers.

Every mode is a ``qemu-system-x86_64`` wrapper that the suite gets as
``QEMU_PROG`` (the name matters: the suite's filters replace
``$(basename $QEMU_PROG):`` in QEMU's messages).  Every wrapper adds the
firmware directories the ``+dfsg`` tree lacks (``-L``) and logs each launch
to ``$TESTBED_IOTESTS_RUNDIR/launches.jsonl``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from testbed.iotests.hook import RULES


class Mode(StrEnum):
    UNHOOKED = "unhooked"  # the patched binary, no -open-hook-fd
    HOOKED = "hooked"  # the patched binary, every open through testbed broker --fd
    SUPERVISED = "supervised"  # stock QEMU under testbed supervise (seccomp)


MODE_HELP = {
    Mode.UNHOOKED: "the patched qemu-system without -open-hook-fd (the reference)",
    Mode.HOOKED: "the patched qemu-system with every open answered by `testbed broker --fd`",
    Mode.SUPERVISED: "stock qemu-system under `testbed supervise` (seccomp user notification)",
}


def broker_command(testbed: Path | None = None) -> list[str]:
    """How the hooked wrapper starts ``testbed broker`` (the venv's entry point)."""
    if testbed is not None:
        return [str(testbed)]
    script = Path(sys.executable).with_name("testbed")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "testbed"]


def supervise_available(testbed: Path | None = None) -> str | None:
    """None when ``testbed supervise`` exists (in ``testbed``, or this tree), else why not."""
    if testbed is not None:
        try:
            done = subprocess.run(
                [str(testbed), "supervise", "--help"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as err:
            return f"mode 'supervised' is not available: cannot run {testbed}: {err}"
        if done.returncode == 0:
            return None
        return f"mode 'supervised' is not available: {testbed} has no `supervise` command"
    from testbed.cli import build_parser  # late: the CLI imports every part

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction) and "supervise" in action.choices:
            return None
    return (
        "mode 'supervised' is not available: there is no `testbed supervise` command "
        "in this tree yet (the seccomp supervisor is being written; the mode runs once it exists)"
    )


@dataclass(frozen=True)
class Wrapper:
    mode: Mode
    path: Path  # .../bin/<mode>/qemu-system-x86_64


def _hook_module() -> Path:
    spec = importlib.util.find_spec("testbed.iotests.hook")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin)


def _launch_log_line() -> str:
    # bash >= 5 has EPOCHREALTIME; one JSON line per launch, as the hook writes.
    return (
        'printf \'{"time": %s, "pid": %d, "broker_pid": null}\\n\' "${EPOCHREALTIME/,/.}" $$ '
        '>> "$TESTBED_IOTESTS_RUNDIR/launches.jsonl"'
    )


def firmware_dirs() -> tuple[Path, ...]:
    from testbed.qemu.commandline import FIRMWARE_DIRS  # late: testbed.qemu is heavy

    return FIRMWARE_DIRS


def wrapper_text(
    mode: Mode, *, qemu: Path, stock: Path | None, supervisor: Path | None = None
) -> str:
    firmware = " ".join(f"-L {shlex.quote(str(d))}" for d in firmware_dirs())
    if mode is Mode.HOOKED:
        # -I: the suite sets PYTHONPATH to its own python/ tree; the hook needs none.
        return (
            f"#!{sys.executable} -I\n"
            "# testbed iotests, mode hooked: see testbed/iotests/hook.py\n"
            "import sys\n"
            f"sys.path.insert(0, {str(_hook_module().parent)!r})\n"
            "import hook\n"
            "sys.exit(hook.main(sys.argv))\n"
        )
    if mode is Mode.UNHOOKED:
        return (
            "#!/bin/bash\n"
            "# testbed iotests, mode unhooked: the patched QEMU without the hook\n"
            f"{_launch_log_line()}\n"
            f'exec -a "$0" {shlex.quote(str(qemu))} {firmware} "$@"\n'
        )
    target = shlex.quote(str(stock)) if stock else "/nonexistent/stock-qemu"
    supervise = " ".join(shlex.quote(a) for a in broker_command(supervisor))
    # the hooked wrapper's grants (hook.py): the suite's directories and TMPDIR
    # to create in, QEMU's working directory read-only, the same rules; plus
    # devices, because the opens of QEMU's children are served too (234 and 262
    # migrate through `exec:cat >FIFO` in TEST_DIR), where the hook sees QEMU's only
    rules = " ".join((*RULES, "--allow-devices"))
    return (
        "#!/bin/bash\n"
        "# testbed iotests, mode supervised: stock QEMU under the seccomp supervisor\n"
        f"{_launch_log_line()}\n"
        "grants=()\n"
        'for d in "$TEST_DIR" "$SOCK_DIR" "$TMPDIR"; do\n'
        '  [ -d "$d" ] && grants+=(--allow-create "$(realpath "$d")")\n'
        "done\n"
        # --die-with-supervisor: the suite's _cleanup_qemu kill -KILLs this pid
        f"exec {supervise} supervise --die-with-supervisor {rules}"
        ' "${grants[@]}" --allow-ro "$(realpath .)"'
        ' --audit "$TESTBED_IOTESTS_RUNDIR/audit.jsonl"'
        f' -- {target} {firmware} "$@"\n'
    )


def write_wrapper(
    bindir: Path, mode: Mode, *, qemu: Path, stock: Path | None, supervisor: Path | None = None
) -> Wrapper:
    d = bindir / mode.value
    d.mkdir(parents=True, exist_ok=True)
    path = d / "qemu-system-x86_64"
    path.write_text(wrapper_text(mode, qemu=qemu, stock=stock, supervisor=supervisor))
    path.chmod(0o755)
    return Wrapper(mode, path)


def wrapper_env(mode: Mode, *, qemu: Path, testbed: Path | None = None) -> dict[str, str]:
    """What the wrapper reads from the environment (besides the run directory)."""
    if mode is not Mode.HOOKED:
        return {}
    return {
        "TESTBED_IOTESTS_QEMU": str(qemu),
        "TESTBED_IOTESTS_FIRMWARE": ":".join(str(d) for d in firmware_dirs()),
        "TESTBED_IOTESTS_BROKER": json.dumps(broker_command(testbed)),
    }


__all__ = [
    "MODE_HELP",
    "Mode",
    "Wrapper",
    "broker_command",
    "supervise_available",
    "wrapper_env",
    "write_wrapper",
]
