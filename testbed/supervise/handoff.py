"""Supervising a process that installs the filter itself: the privileged half of a hand-off.

:class:`~testbed.supervise.Supervisor` forks its command and installs the
filter in the child.  When someone else starts the command -- libvirt runs
its ``<emulator>`` after dropping to ``libvirt-qemu`` -- only that process
can create the filter's listener (the listener belongs to whoever installs
the filter), so it installs the filter itself and sends the listener over a
UNIX socket (testbed/libvirt/emulator.py is that side).  This module is the
other side, with nothing forked:

* :func:`confinement` -- the BPF program (bytes) and a Landlock ruleset fd
  for a given process and binary, built here (as root, with the system
  profile) and sent to the process, which only applies them;
* :class:`ServedListener` -- serve a listener received that way with the
  broker's policy engine, exactly as the Supervisor serves its own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from testbed.broker import AuditLog, AuditRecord, Policy
from testbed.errors import SuperviseError
from testbed.supervise import bpf
from testbed.supervise import landlock as ll
from testbed.supervise.decide import Decider
from testbed.supervise.notify import DEFAULT_MAX_WORKERS, NotificationServer
from testbed.supervise.profile import SystemProfile
from testbed.supervise.seccomp import Listener, check_user_notification


def confinement(
    *,
    pid: int,
    binary: str | Path,
    profile: SystemProfile | None,
    exec_paths: Sequence[str | Path] = (),
    extra_rules: Sequence[tuple[str, ll.FS]] = (),
) -> tuple[bytes, ll.Ruleset]:
    """The filter and the Landlock ruleset for process ``pid``, which will exec ``binary``.

    The ruleset is the one ``testbed supervise --landlock`` gives its child:
    the profile's rules, execute+read on ``binary``, the profile's and
    ``exec_paths``' executables and each one's ELF interpreter, and read on
    ``/proc/PID`` when the profile has ``proc_self`` (the pid survives the
    exec), and ``extra_rules`` (Landlock only: for what the kernel opens on
    the process's behalf, out of seccomp's sight).  The caller sends
    ``ruleset.fd`` and closes the ruleset.  A kernel without user
    notification or Landlock is a :class:`~testbed.errors.KernelFeatureError`.
    """
    check_user_notification()
    path = os.fspath(binary)
    if not os.path.isabs(path) or not os.path.isfile(path):
        raise SuperviseError(f"the binary to confine, {path!r}, is not an absolute path to a file")
    ruleset = ll.Ruleset(ll.abi_version())
    try:
        rules = profile.landlock_rules() if profile is not None else []
        executables = [
            path,
            *(profile.exec if profile else ()),
            *(os.fspath(p) for p in exec_paths),
        ]
        for exe in executables:
            real = os.path.realpath(exe)
            rules.append((real, ll.FS.EXECUTE | ll.FS.READ_FILE))
            interp = ll.elf_interpreter(real)
            if interp:
                rules.append((os.path.realpath(interp), ll.FS.EXECUTE | ll.FS.READ_FILE))
        if profile is not None and profile.proc_self:
            rules.append((f"/proc/{pid}", ll.FS.READ_FILE | ll.FS.READ_DIR))
        rules += extra_rules
        for rule_path, rights in rules:
            ruleset.allow(rule_path, rights)
    except OSError as err:
        ruleset.close()
        raise SuperviseError(f"cannot build the Landlock ruleset for pid {pid}: {err}") from err
    return bpf.open_filter(), ruleset


class ServedListener:
    """Serves the opens behind a listener fd someone handed over, until :meth:`stop`
    or until every process under that filter has exited."""

    def __init__(
        self,
        listener_fd: int,
        policy: Policy,
        *,
        profile: SystemProfile | None,
        audit_path: str | Path | None = None,
        keep_records: bool = False,
        max_workers: int = DEFAULT_MAX_WORKERS,
        decider: Decider | None = None,
    ) -> None:
        """``decider`` replaces the default ``Decider(policy, profile)`` (a caller's
        subclass that adds to what an open does); it is closed with this object."""
        self.policy = policy
        self.audit = AuditLog(audit_path, keep=keep_records)
        self.decider = decider if decider is not None else Decider(policy, profile)
        self.server = NotificationServer(
            Listener(listener_fd), self.decider, self.audit, max_workers=max_workers
        )
        self.server.start()

    @property
    def records(self) -> list[AuditRecord]:
        return self.audit.snapshot()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for serving to end by itself (nobody left under the filter)."""
        return self.server.join(timeout)

    def stop(self) -> None:
        """Stop serving: later opens under the filter fail with ENOSYS."""
        self.server.stop()

    def close(self) -> None:
        self.stop()
        self.decider.close()
        self.audit.close()


__all__ = ["ServedListener", "confinement"]
