"""The frozen configuration of a QEMU run and the command line built from it.

Nothing here starts a process: :func:`build_argv` is a pure function of a
:class:`MachineConfig` and the descriptor numbers QEMU will inherit, so the
command line can be checked without QEMU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from testbed.qemu.binaries import STOCK_QEMU

#: Where Debian keeps the firmware (seabios, iPXE option ROMs, qemu-system-data).
FIRMWARE_DIRS: tuple[Path, ...] = (
    Path("/usr/share/seabios"),
    Path("/usr/lib/ipxe/qemu"),
    Path("/usr/share/qemu"),
)

ACCELERATORS = ("tcg", "kvm")

# Mounts an empty tmpfs over each directory before the "--", then execs the
# rest.  Run by ``sh -c`` in the new mount namespace made by unshare(1).
_HIDE_SCRIPT = (
    'while [ "$1" != -- ]; do '
    'mount -t tmpfs -o mode=0755 testbed-hidden "$1" || '
    '{ echo "testbed: cannot hide $1 with a tmpfs" >&2; exit 125; }; '
    'shift; done; shift; exec "$@"'
)


@dataclass(frozen=True, kw_only=True)
class MachineConfig:
    """How to run one QEMU.

    ``hook`` gives QEMU ``-open-hook-fd`` on one end of a socket pair (only
    the patched binary knows the option); ``serial`` puts the first serial
    port on another socket pair, for a console the caller drives.
    ``hide_dirs`` run QEMU in a new mount namespace where each of those
    directories is an empty tmpfs: what QEMU then opens there, it can only
    have got through the hook.  ``wrapper`` goes before everything (for
    example ``("strace", "-f", "-o", "trace", "-e", "trace=openat")``).
    ``line_buffered`` runs QEMU under ``stdbuf -oL``: HMP ``qemu-io`` prints
    to QEMU's stdout (the log), which is otherwise flushed only at exit.
    ``env`` adds variables to QEMU's environment (e.g. ``TMPDIR`` for
    ``-snapshot``).  ``cwd`` is QEMU's working directory (default: ours),
    against which it resolves relative names.
    """

    binary: Path = STOCK_QEMU
    args: tuple[str, ...] = ()
    machine: str = "none"
    accel: str = "tcg"
    hook: bool = False
    serial: bool = False
    hide_dirs: tuple[Path, ...] = ()
    pass_fds: tuple[int, ...] = ()
    firmware_dirs: tuple[Path, ...] = FIRMWARE_DIRS
    wrapper: tuple[str, ...] = ()
    line_buffered: bool = True
    env: tuple[tuple[str, str], ...] = ()
    cwd: Path | None = None
    log_path: Path | None = None
    launch_timeout: float = 60.0
    command_timeout: float = 60.0
    shutdown_timeout: float = 15.0

    def __post_init__(self) -> None:
        if self.accel not in ACCELERATORS:
            raise ValueError(f"accel {self.accel!r} is not one of {', '.join(ACCELERATORS)}")
        for name in ("launch_timeout", "command_timeout", "shutdown_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)!r}")
        for d in self.hide_dirs:
            if not d.is_absolute():
                raise ValueError(f"hide_dirs entry {str(d)!r} is not an absolute path")
        for fd in self.pass_fds:
            if fd <= 2:
                raise ValueError(f"pass_fds entry {fd} is stdin, stdout or stderr")
        for fw in self.firmware_dirs:
            if any(fw == d or d in fw.parents for d in self.hide_dirs):
                raise ValueError(f"firmware directory {fw} would be hidden by hide_dirs")


def build_argv(
    config: MachineConfig,
    *,
    qmp_fd: int,
    hook_fd: int | None = None,
    serial_fd: int | None = None,
) -> list[str]:
    """The full command line: wrapper, mount-namespace prefix, QEMU and its options."""
    if config.hook != (hook_fd is not None):
        raise ValueError("hook_fd must be given exactly when config.hook is set")
    if config.serial != (serial_fd is not None):
        raise ValueError("serial_fd must be given exactly when config.serial is set")
    qemu = ["stdbuf", "-oL", "-eL"] if config.line_buffered else []
    qemu.append(str(config.binary))
    for fw in config.firmware_dirs:
        qemu += ["-L", str(fw)]
    qemu += [
        "-nodefaults",
        "-display", "none",
        "-machine", config.machine,
        "-accel", config.accel,
        "-chardev", f"socket,id=qmp,fd={qmp_fd}",
        "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip
    if hook_fd is not None:
        qemu += ["-open-hook-fd", str(hook_fd)]
    if serial_fd is not None:
        qemu += ["-chardev", f"socket,id=ser0,fd={serial_fd}", "-serial", "chardev:ser0"]
    qemu += list(config.args)
    if config.hide_dirs:
        qemu = hide_prefix(config.hide_dirs) + qemu
    return list(config.wrapper) + qemu


def hide_prefix(dirs: tuple[Path, ...]) -> list[str]:
    """``unshare`` + ``sh`` words that run the rest in a namespace hiding ``dirs``."""
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _HIDE_SCRIPT, "sh"]
    return prefix + [str(d) for d in dirs] + ["--"]
