"""Start a command under the filter (and Landlock) and serve its opens: the Python API.

::

    policy = Policy.from_grants(ro=["/srv/base"], create=["/srv/vm1"])
    with Supervisor(policy, landlock=True, audit_path="vm1.jsonl") as sup:
        proc = sup.popen(["qemu-system-x86_64", ...], pass_fds=(qmp_fd,))
        ...
        proc.wait()
    print(sup.records)     # one SeccompAuditRecord per open, via="seccomp"

A :class:`Supervisor` runs one command (its children stay under the same
filter and are served too).  Serving ends when every process under the
filter has exited, or at :meth:`stop` (the command's later opens then fail
with ENOSYS, as when the supervisor dies).  ``landlock_only`` confines
without serving: the command then opens everything itself, under the
Landlock ruleset, which grants nothing on the image directories.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from testbed.broker import AuditLog, AuditRecord, Policy
from testbed.errors import SuperviseError, TransportError, WaitTimeout
from testbed.supervise import bpf
from testbed.supervise import landlock as ll
from testbed.supervise.decide import Decider
from testbed.supervise.launcher import FAILED, LISTENER, NONE, ChildPlan, child_side
from testbed.supervise.notify import DEFAULT_MAX_WORKERS, NotificationServer
from testbed.supervise.profile import DEFAULT_PROFILE, SystemProfile, load_profile
from testbed.supervise.seccomp import Listener, check_user_notification
from testbed.transport import recv_with_fds

log = logging.getLogger("testbed.supervise")

#: How long the command may take from fork to handing back its listener.
HANDSHAKE_TIMEOUT = 30.0


class Supervisor:
    """Serves the opens of one command under a :class:`~testbed.broker.Policy`."""

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        profile: SystemProfile | str | Path | None = DEFAULT_PROFILE,
        landlock: bool = False,
        landlock_only: bool = False,
        audit_path: str | Path | None = None,
        keep_records: bool = True,
        exec_paths: Sequence[str | Path] = (),
        max_workers: int = DEFAULT_MAX_WORKERS,
        wait_killable: bool = True,
        die_with_supervisor: bool = False,
    ) -> None:
        self.policy = policy if policy is not None else Policy()
        self.profile = load_profile(profile) if isinstance(profile, str | Path) else profile
        self.landlock = landlock or landlock_only
        self.serving = not landlock_only
        self.exec_paths = tuple(str(p) for p in exec_paths)
        self.max_workers = max_workers
        #: Off only to show what the flag prevents (tests); never in use.
        self.wait_killable = wait_killable
        #: SIGKILL the command if this process dies first (off: a killed
        #: supervisor leaves QEMU running on the fds it has, opens failing ENOSYS).
        self.die_with_supervisor = die_with_supervisor
        # Say what is missing before anything starts: no silent fallback.
        if self.serving:
            check_user_notification()
        self.landlock_abi = ll.abi_version() if self.landlock else None
        self.audit = AuditLog(audit_path, keep=keep_records)
        self.decider = Decider(self.policy, self.profile)
        self.server: NotificationServer | None = None
        self.process: subprocess.Popen[bytes] | None = None
        #: The Landlock rules the command got (path, rights), for logs and tests.
        self.landlock_rules: list[ll.Rule] = []

    # -- starting the command -------------------------------------------------------------

    def popen(self, argv: Sequence[str | Path], **kwargs: Any) -> subprocess.Popen[bytes]:
        """``subprocess.Popen(argv, **kwargs)`` under the filter; serving starts at once."""
        if self.process is not None:
            raise SuperviseError("this Supervisor already runs a command: make another")
        if "preexec_fn" in kwargs:
            raise SuperviseError("popen: preexec_fn is the supervisor's own")
        words = [str(w) for w in argv]
        if not words:
            raise SuperviseError("popen: empty command")
        self._fit_profile(words[0], kwargs.get("env"))
        ruleset = self._ruleset(words, kwargs.get("env")) if self.landlock else None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        plan = ChildPlan(
            sock=theirs,
            program=bpf.open_filter() if self.serving else None,
            ruleset_fd=ruleset.fd if ruleset else None,
            proc_self_rights=(
                ll.FS.READ_FILE | ll.FS.READ_DIR
                if ruleset and self.profile and self.profile.proc_self
                else None
            ),
            wait_killable=self.wait_killable,
            die_with_parent=self.die_with_supervisor,
        )
        # The receiver must be up before the child installs its filter: any open
        # it makes before execve (or execve's own failure path) needs an answer.
        handshake = _Handshake(ours, self._serve)
        handshake.start()
        try:
            self.process = subprocess.Popen(words, preexec_fn=child_side(plan), **kwargs)
        except subprocess.SubprocessError as err:
            handshake.join(HANDSHAKE_TIMEOUT)
            raise SuperviseError(
                f"cannot start {words[0]} under the supervisor: {handshake.failure or err}"
            ) from err
        except OSError:
            handshake.join(HANDSHAKE_TIMEOUT)
            self.server = handshake.server  # ends by itself: the child is gone
            raise
        finally:
            theirs.close()
            if ruleset is not None:
                ruleset.close()
        if not handshake.join(HANDSHAKE_TIMEOUT):
            self.process.kill()
            raise WaitTimeout(
                f"the listener from {words[0]} (pid {self.process.pid})", HANDSHAKE_TIMEOUT
            )
        if handshake.failure:
            raise SuperviseError(f"the launcher of {words[0]} failed: {handshake.failure}")
        self.server = handshake.server
        if self.serving:
            if self.server is None:
                raise SuperviseError(f"{words[0]} started without sending its listener")
            log.info("pid %d runs %s under the filter", self.process.pid, words[0])
        return self.process

    def _fit_profile(self, program: str, env: Any) -> None:
        """The profile plus the QEMU directories of every executable the command may
        run (``program`` and ``exec_paths``: a wrapper such as stdbuf execs QEMU),
        if the profile asks for them."""
        if self.profile is None or not self.profile.command_prefix:
            return
        profile = self.profile
        for path in (self._which(program, env), *self.exec_paths):
            profile = profile.for_command(path)
        if profile is not self.profile:
            self.decider.close()
            self.profile = profile
            self.decider = Decider(self.policy, profile)

    def _serve(self, listener: Listener) -> NotificationServer:
        server = NotificationServer(
            listener, self.decider, self.audit, max_workers=self.max_workers
        )
        server.start()
        return server

    def _ruleset(self, argv: list[str], env: Any) -> ll.Ruleset:
        ruleset = ll.Ruleset(self.landlock_abi)
        try:
            rules = self.profile.landlock_rules() if self.profile else []
            for path in self._executables(argv, env):
                rules.append((path, ll.FS.EXECUTE | ll.FS.READ_FILE))
            for path, rights in rules:
                ruleset.allow(path, rights)
        except OSError as err:
            ruleset.close()
            raise SuperviseError(f"cannot build the Landlock ruleset: {err}") from err
        self.landlock_rules = list(ruleset.rules)
        return ruleset

    @staticmethod
    def _which(program: str, env: Any) -> str:
        search = (env or os.environ).get("PATH", os.defpath)
        found = shutil.which(program, path=search)
        if found is None:
            raise SuperviseError(f"cannot run {program}: not found in PATH")
        return found

    def _executables(self, argv: list[str], env: Any) -> list[str]:
        """The command's binary, the extra executables, and each one's ELF interpreter."""
        found = self._which(argv[0], env)
        paths = [found, *(self.profile.exec if self.profile else ()), *self.exec_paths]
        out: list[str] = []
        for p in paths:
            real = os.path.realpath(p)
            out.append(real)
            interp = ll.elf_interpreter(real)
            if interp:
                out.append(os.path.realpath(interp))
        return out

    # -- while it runs ----------------------------------------------------------------------

    @property
    def records(self) -> list[AuditRecord]:
        return self.audit.snapshot()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the command to exit and serving to end; its exit status."""
        if self.process is None:
            raise SuperviseError("wait: no command was started")
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired as err:
            raise WaitTimeout(f"pid {self.process.pid} to exit", timeout or 0) from err
        if self.server is not None and not self.server.join(5.0):
            log.warning("serving has not ended 5 s after pid %d exited", self.process.pid)
        return code

    def stop(self) -> None:
        """Stop serving: the command's later opens fail with ENOSYS."""
        if self.server is not None:
            self.server.stop()

    def close(self) -> None:
        self.stop()
        self.decider.close()
        self.audit.close()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None and exc is not None:
            self.process.kill()
            self.process.wait()
        self.close()


class _Handshake(threading.Thread):
    """Waits for the child's message: its listener, NONE, or why the launcher failed."""

    def __init__(
        self, sock: socket.socket, serve: Callable[[Listener], NotificationServer]
    ) -> None:
        super().__init__(name="seccomp-handshake", daemon=True)
        self.sock = sock
        self._serve = serve
        self.failure = ""
        self.server: NotificationServer | None = None
        self._done = threading.Event()

    def run(self) -> None:
        try:
            self.sock.settimeout(HANDSHAKE_TIMEOUT)
            # testbed.transport's receive (MSG_CMSG_CLOEXEC), not socket.recv_fds,
            # which drops its flags (CPython 3.11): an inheritable listener
            # would reach the next command we start.
            msg, fds = recv_with_fds(self.sock)
            if msg.startswith(LISTENER) and len(fds) == 1:
                self.server = self._serve(Listener(fds[0]))
            else:
                for fd in fds:
                    os.close(fd)
                if msg.startswith(FAILED):
                    self.failure = msg[1:].decode(errors="replace")
                elif msg and not msg.startswith(NONE):
                    self.failure = f"unexpected message {msg[:40]!r}"
        except (OSError, TransportError) as err:
            self.failure = f"no answer from the launcher: {err}"
        finally:
            self.sock.close()
            self._done.set()

    def join(self, timeout: float | None = None) -> bool:  # type: ignore[override]
        self._done.wait(timeout)
        return self._done.is_set()


def supervised_popen(
    argv: Sequence[str | Path], policy: Policy | None = None, **kwargs: Any
) -> tuple[subprocess.Popen[bytes], Supervisor]:
    """Start ``argv`` under a new :class:`Supervisor`; keyword arguments not meant
    for the supervisor go to ``subprocess.Popen``."""
    names = {
        "profile", "landlock", "landlock_only", "audit_path", "keep_records",
        "exec_paths", "max_workers", "wait_killable", "die_with_supervisor",
    }  # fmt: skip
    sup_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    sup = Supervisor(policy, **sup_kwargs)
    try:
        return sup.popen(argv, **kwargs), sup
    except BaseException:
        sup.close()
        raise
