"""Starting QEMU for the guest.

Stopgap until ``testbed.qemu.machine`` (the project's machine wrapper) is in
the tree: this is the smallest launcher the guest needs, and
:class:`GuestQemu` is the only thing :mod:`testbed.guest.session` uses, so
switching to the wrapper changes this module alone.  Everything runs over
socketpairs: QMP, the serial console, and ``-open-hook-fd``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from qemu.qmp.legacy import QEMUMonitorProtocol

from testbed.errors import LaunchError, QEMUError, WaitTimeout

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """How to start QEMU for one guest boot."""

    binary: Path
    kernel: Path
    initrd: Path
    #: ``-drive`` options of the disk (without ``if=``/``id=``)
    drive: str
    accel: str = "tcg"
    memory_mib: int = 256
    append: str = "console=ttyS0 panic=-1 loglevel=4"
    firmware_dirs: Sequence[str] = ()
    #: a connected socket QEMU gets as ``-open-hook-fd`` (None: no hook)
    hook: socket.socket | None = None
    #: directories hidden behind an empty tmpfs in a private mount namespace
    hide: Sequence[Path] = ()
    log_path: Path = Path("qemu.log")
    extra_args: Sequence[str] = field(default_factory=tuple)


class GuestQemu:
    """A running QEMU: ``console`` (socket), ``qmp``, ``hmp()``, ``wait()``, ``kill()``."""

    DRIVE_ID = "disk0"

    def __init__(
        self, config: LaunchConfig, *, qmp_timeout: float = 30.0, command_timeout: float = 60.0
    ) -> None:
        self.config = config
        self.command_timeout = command_timeout
        self.console, con_theirs = socket.socketpair()
        mon_ours, mon_theirs = socket.socketpair()
        argv = [
            str(config.binary), "-accel", config.accel, "-m", str(config.memory_mib),
            "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", str(config.kernel), "-initrd", str(config.initrd),
            "-append", config.append,
            "-chardev", f"socket,id=con,fd={con_theirs.fileno()}", "-serial", "chardev:con",
            "-chardev", f"socket,id=mon,fd={mon_theirs.fileno()}",
            "-mon", "chardev=mon,mode=control",
            "-drive", f"{config.drive},if=none,id={self.DRIVE_ID}",
            "-device", f"virtio-blk-pci,drive={self.DRIVE_ID}",
        ]
        for d in config.firmware_dirs:
            argv += ["-L", d]
        pass_fds = [con_theirs.fileno(), mon_theirs.fileno()]
        if config.hook is not None:
            argv += ["-open-hook-fd", str(config.hook.fileno())]
            pass_fds.append(config.hook.fileno())
        argv += list(config.extra_args)
        if config.hide:
            # Each hidden directory is covered by an empty tmpfs in a private
            # mount namespace: QEMU can reach what is in it only through the hook.
            script = 'for d in "$@"; do [ "$d" = -- ] && break; mount -t tmpfs none "$d"; done; '
            script += 'while [ "$1" != -- ]; do shift; done; shift; exec "$@"'
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                    "sh", *map(str, config.hide), "--", *argv]
        self.argv = argv
        self._logfile = config.log_path.open("wb")
        log.info("starting %s", " ".join(argv))
        try:
            self.proc = subprocess.Popen(argv, pass_fds=pass_fds, stdin=subprocess.DEVNULL,
                                         stdout=self._logfile, stderr=subprocess.STDOUT)
        except OSError as err:
            self._logfile.close()
            raise LaunchError(f"cannot run {argv[0]}: {err}", argv=argv, exitcode=None,
                              log="") from err
        finally:
            con_theirs.close()
            mon_theirs.close()
        if config.hook is not None:
            config.hook.close()  # QEMU holds its end; ours would keep the broker's peer alive
        self.qmp = QEMUMonitorProtocol(mon_ours)
        try:
            self.qmp.connect(negotiate=True)
        except Exception as err:
            self._launch_failed("QEMU did not answer QMP", err, qmp_timeout)
        self.qmp.settimeout(command_timeout)

    def _launch_failed(self, message: str, err: Exception, timeout: float) -> NoReturn:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.close()
        raise LaunchError(message, argv=self.argv, exitcode=code, log=self.log()) from err

    def log(self) -> str:
        """QEMU's stdout and stderr so far."""
        self._logfile.flush()
        try:
            return self.config.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def command(self, name: str, **args: Any) -> Any:
        """A QMP command; a QMP error raises :class:`QEMUError` with QEMU's message."""
        try:
            return self.qmp.cmd(name, **args)
        except TimeoutError as err:
            raise WaitTimeout(f"QMP {name} to answer", self.command_timeout) from err
        except Exception as err:
            raise QEMUError(f"QMP {name} failed: {err}") from err

    def hmp(self, line: str) -> str:
        """An HMP command line; returns its output (HMP reports errors as text)."""
        out: str = self.command("human-monitor-command", **{"command-line": line})
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        """Wait for QEMU to exit on its own."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as err:
            raise WaitTimeout(f"QEMU (pid {self.proc.pid}) to exit", timeout) from err

    def shutdown(self, timeout: float = 10.0) -> str:
        """Quit over QMP, then kill; says which it took."""
        if not self.alive():
            self.close()
            return "exited"
        how = "quit"
        try:
            self.qmp.cmd("quit")
            self.proc.wait(timeout)
        except Exception:
            how = "killed"
            self.proc.kill()
            self.proc.wait(timeout)
        self.close()
        return how

    def close(self) -> None:
        for closer in (self.qmp.close, self.console.close, self._logfile.close):
            with contextlib.suppress(Exception):  # best effort: QEMU may be gone
                closer()
