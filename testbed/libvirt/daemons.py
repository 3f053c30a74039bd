"""libvirtd and virtlogd, started by hand (PID 1 is not systemd here).

:class:`Daemons` uses the daemons that are already running and starts only
those that are not; :meth:`Daemons.stop` stops only what it started.

A libvirtd it starts runs in a private mount namespace where the testbed's
``qemu.conf`` (:data:`QEMU_CONF`) is bind-mounted over
``/etc/libvirt/qemu.conf``: the system's file is never edited, and the
settings reach only that libvirtd (and the QEMUs it starts).  A libvirtd
that was already running keeps its own configuration, which then needs the
same settings (docs/libvirt.md).

The same namespace puts an empty, root-only regular file over ``/dev/kvm``.
Here ``/dev/kvm`` is root's, mode 0600: libvirt's capability probe records
KVM as enabled, then its check "can libvirt-qemu open /dev/kvm" says no,
and it throws the cache away on every look-up (about 4 s each, 48 s per
``virsh create``).  ``/dev/null`` in its place is no better (then KVM
"should be usable now" but the probe found none).  With the empty file
both agree that there is no KVM.  The testbed's domains are TCG anyway
(DESIGN.md: nested KVM is unreliable here).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from testbed.errors import LibvirtError, WaitTimeout

log = logging.getLogger(__name__)

#: What the testbed needs from libvirt's QEMU driver, and why.
QEMU_CONF = """\
# qemu.conf for the libvirtd that `testbed libvirt` starts (docs/libvirt.md).
# QEMU runs unprivileged; libvirt drops to this user before it runs the emulator.
user = "libvirt-qemu"
group = "libvirt-qemu"
# Do not chown the images to the QEMU user: they stay root's, mode 0600, so
# the only way QEMU reaches them is the broker.
dynamic_ownership = 0
remember_owner = 0
# No AppArmor/SELinux on this machine; DAC (the user above) still applies.
security_driver = "none"
# No private /dev and no cgroups: neither works in this container.
namespaces = [ ]
cgroup_controllers = [ ]
"""

LIBVIRTD_SOCK = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCK = Path("/run/libvirt/virtlogd-sock")
PIDFILES = {"libvirtd": Path("/run/libvirtd.pid"), "virtlogd": Path("/run/virtlogd.pid")}

# In the new mount namespace: bind the config ($1) over the system's, put
# an empty root-only file ($2) over /dev/kvm (see above), become libvirtd.
_LIBVIRTD_SCRIPT = (
    'mount --bind "$1" /etc/libvirt/qemu.conf && '
    '{ [ ! -e /dev/kvm ] || mount --bind "$2" /dev/kvm; } && exec libvirtd'
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_pid(name: str) -> int | None:
    """The pid of a running ``name`` (libvirtd, virtlogd) from its pidfile, or None."""
    try:
        pid = int(PIDFILES[name].read_text().strip())
    except (OSError, ValueError):
        return None
    if not _alive(pid):
        return None
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    return pid if comm == name else None


def _accepts(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError:
        return False
    finally:
        s.close()
    return True


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _accepts(path):
        if proc.poll() is not None:
            raise LibvirtError(f"{what} exited with status {proc.returncode} before {path} opened")
        if time.monotonic() > deadline:
            raise LibvirtError(f"{what} did not open {path}") from WaitTimeout(
                f"{what} to listen on {path}", timeout
            )
        time.sleep(0.1)


@dataclass
class Daemons:
    """The libvirt daemons for one run: found or started, stopped only if started."""

    state_dir: Path
    timeout: float = 60.0
    started: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    found: dict[str, int] = field(default_factory=dict)

    def start(self) -> Daemons:
        for binary in ("libvirtd", "virtlogd", "unshare"):
            if shutil.which(binary) is None:
                raise LibvirtError(f"{binary} is not installed (scripts/deps.sh libvirt)")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._ensure("virtlogd", ["virtlogd"], VIRTLOGD_SOCK)
            conf = self.state_dir / "qemu.conf"
            conf.write_text(QEMU_CONF)
            no_kvm = self.state_dir / "no-kvm"
            no_kvm.touch()
            os.chmod(no_kvm, 0o600)
            argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", _LIBVIRTD_SCRIPT]
            self._ensure("libvirtd", [*argv, "sh", str(conf), str(no_kvm)], LIBVIRTD_SOCK)
        except BaseException:
            self.stop()
            raise
        return self

    def _ensure(self, name: str, argv: list[str], sock: Path) -> None:
        pid = running_pid(name)
        if pid is not None:
            log.info("%s is running already (pid %d): using it", name, pid)
            self.found[name] = pid
            return
        logfile = self.state_dir / f"{name}.log"
        with logfile.open("ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        self.started[name] = proc
        log.info("started %s (pid %d), log %s", name, proc.pid, logfile)
        try:
            _wait_socket(sock, proc, name, self.timeout)
        except LibvirtError as err:
            tail = logfile.read_text(errors="replace").splitlines()[-10:]
            raise LibvirtError(f"{err}; log {logfile}:\n" + "\n".join(tail)) from err

    def stop(self) -> list[str]:
        """Stop what :meth:`start` started, libvirtd first; returns how each ended."""
        ended = []
        for name in ("libvirtd", "virtlogd"):
            proc = self.started.pop(name, None)
            if proc is None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.timeout)
                ended.append(f"{name} stopped")
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(10)
                ended.append(f"{name} killed after {self.timeout:g}s")
        return ended

    def __enter__(self) -> Daemons:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
