"""One QEMU process: launch, QMP over a socket pair, HMP, brokers on the hook, shutdown.

::

    config = MachineConfig(binary=patched_qemu_path(), hook=True,
                           args=("-drive", f"file={img},if=none,id=drive0"))
    with Machine(config) as vm:          # launch() ... shutdown()
        vm.start_broker(Policy.from_grants(ro=[img.parent]))   # before launch
        ...

A :class:`Machine` is launched once.  Everything it creates (socket pairs,
the log file, brokers it started) is released by :meth:`shutdown`, which
first asks QEMU to ``quit`` and kills it if that does not work, and records
which in :attr:`Machine.shutdown_method`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError

from testbed.broker import Broker, Policy
from testbed.errors import (
    LaunchError,
    QEMUError,
    QEMUUsageError,
    TransportError,
    WaitTimeout,
)

# QMPCommandError lived here before it joined errors.py: old imports keep working.
from testbed.errors import QMPCommandError as QMPCommandError
from testbed.qemu.binaries import is_runnable, open_hook_server_path
from testbed.qemu.commandline import MachineConfig, build_argv

log = logging.getLogger("testbed.qemu")

_T = TypeVar("_T")


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class Machine:
    """A QEMU process built from a :class:`MachineConfig`."""

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self.state = State.NEW
        self.argv: list[str] = []
        self.process: subprocess.Popen[bytes] | None = None
        #: "tcg" or "kvm", from query-kvm once launched.
        self.accel_used: str | None = None
        #: "quit" or "kill" (or "exited" if QEMU was gone already), after shutdown.
        self.shutdown_method: str | None = None
        self.exitcode: int | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if config.log_path is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="testbed-qemu-")
            self.log_path = Path(self._tmpdir.name) / "qemu.log"
        else:
            self.log_path = config.log_path
        self._loop = asyncio.new_event_loop()
        self._qmp = QMPClient("qemu")
        self._qmp_ours, self._qmp_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._hook_ours: socket.socket | None = None
        self._hook_theirs: socket.socket | None = None
        if config.hook:
            self._hook_ours, self._hook_theirs = socket.socketpair(
                socket.AF_UNIX, socket.SOCK_STREAM
            )
        self._serial_ours: socket.socket | None = None
        self._serial_theirs: socket.socket | None = None
        if config.serial:
            self._serial_ours, self._serial_theirs = socket.socketpair(
                socket.AF_UNIX, socket.SOCK_STREAM
            )
        self.brokers: list[Broker] = []
        self.helpers: list[subprocess.Popen[bytes]] = []
        self._reattached = 0

    # -- the hook end, before launch ------------------------------------------

    @property
    def hook_socket(self) -> socket.socket:
        """Our end of the -open-hook-fd socket pair (until a broker takes it)."""
        if self._hook_ours is None:
            raise QEMUError("this machine has no hook socket (config.hook is off, or it was taken)")
        return self._hook_ours

    def take_hook_socket(self) -> socket.socket:
        """Hand our end of the hook socket to the caller, who now owns it."""
        sock = self.hook_socket
        self._hook_ours = None
        return sock

    def start_broker(self, policy: Policy, *, audit_path: str | Path | None = None) -> Broker:
        """Serve the hook with an in-process :class:`Broker`, stopped at shutdown."""
        broker = Broker(policy, audit_path=audit_path)
        broker.add_connection(self.take_hook_socket())
        broker.start()
        self.brokers.append(broker)
        return broker

    def start_hook_process(self, argv: Sequence[str], *, log_path: Path | None = None) -> int:
        """Serve the hook with a separate process; ``{fd}`` in ``argv`` is its descriptor.

        The process inherits our end of the socket pair and is waited for at
        shutdown.  Returns its pid.
        """
        return self._spawn_hook_process(self.take_hook_socket(), argv, log_path)

    def _spawn_hook_process(
        self, sock: socket.socket, argv: Sequence[str], log_path: Path | None
    ) -> int:
        fd = sock.fileno()
        words = [w.replace("{fd}", str(fd)) for w in argv]
        out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                words, pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        except OSError as err:
            raise LaunchError(
                f"cannot start the hook server: {err}", argv=words, exitcode=None, log=""
            ) from err
        finally:
            if not isinstance(out, int):
                out.close()
            sock.close()
        self.helpers.append(proc)
        return proc.pid

    def start_broker_process(
        self, broker_args: Sequence[str], *, log_path: Path | None = None
    ) -> int:
        """Serve the hook with ``python -m testbed broker --fd N BROKER_ARGS``."""
        argv = [sys.executable, "-m", "testbed", "broker", "--fd", "{fd}", *broker_args]
        return self.start_hook_process(argv, log_path=log_path)

    def start_open_hook_server(
        self, root: Path, *, log_path: Path, server: Path | None = None
    ) -> int:
        """Serve the hook with the series' C example server, granting below ``root``."""
        binary = server or open_hook_server_path()
        argv = [str(binary), "--root", str(root), "--log", str(log_path), "--fd", "{fd}"]
        return self.start_hook_process(argv)

    # -- a new broker for a running QEMU (patch 0007, QMP open-hook-set) -------

    def reattach_hook(self, sock: socket.socket) -> None:
        """Make ``sock`` (connected to a broker) QEMU's hook socket, replacing the old one.

        The descriptor rides SCM_RIGHTS with QMP ``getfd``, then
        ``open-hook-set`` swaps it in: QEMU closes the old socket and clears
        the broken state.  ``sock`` is closed here (QEMU has its copy), also
        when QEMU refuses it (QMPCommandError: no hook, not a connected UNIX
        stream socket).
        """
        self._require_running("open-hook-set")
        self._reattached += 1
        fdname = f"testbed-open-hook-{self._reattached}"
        try:
            self._qmp.send_fd_scm(sock.fileno())
            self.qmp("getfd", fdname=fdname)
        finally:
            sock.close()
        self.qmp("open-hook-set", fdname=fdname)
        log.info("QEMU pid %d: hook socket replaced (%s)", self._pid(), fdname)

    def reattach_broker(self, policy: Policy, *, audit_path: str | Path | None = None) -> Broker:
        """Serve the hook of the running QEMU with a new in-process :class:`Broker`."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        broker = Broker(policy, audit_path=audit_path)
        broker.add_connection(ours)
        broker.start()
        self.brokers.append(broker)
        self.reattach_hook(theirs)
        return broker

    def reattach_broker_process(
        self, broker_args: Sequence[str], *, log_path: Path | None = None
    ) -> int:
        """Serve the hook with a new ``python -m testbed broker --fd N BROKER_ARGS``; its pid."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [sys.executable, "-m", "testbed", "broker", "--fd", "{fd}", *broker_args]
        try:
            pid = self._spawn_hook_process(ours, argv, log_path)
        except BaseException:
            theirs.close()
            raise
        self.reattach_hook(theirs)
        return pid

    def reattach_broker_socket(self, path: str | Path, *, timeout: float = 10.0) -> None:
        """Connect to a broker listening at ``path`` (``testbed broker --socket``) for QEMU.

        The broker sees this process as the peer (SO_PEERCRED is taken at
        connect()), not QEMU: peer_uid / peer_pid rules match the caller.
        Retries a missing or refusing socket until ``timeout`` (a broker just
        started may not listen yet).
        """
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as err:
                sock.close()
                if time.monotonic() >= deadline:
                    raise WaitTimeout(f"a broker listening at {path} ({err})", timeout) from err
                time.sleep(0.02)
            except OSError as err:  # e.g. a path over the 107-byte limit
                sock.close()
                raise TransportError(f"cannot connect to a broker at {path}: {err}") from err
        self.reattach_hook(sock)

    @property
    def console_socket(self) -> socket.socket:
        """Our end of the serial console (``config.serial``), e.g. for pexpect's fdspawn."""
        if self._serial_ours is None:
            raise QEMUError("this machine has no serial console socket (config.serial is off)")
        return self._serial_ours

    # -- launch --------------------------------------------------------------

    def launch(self) -> Machine:
        """Start QEMU and wait (``launch_timeout``) for QMP; raise LaunchError if it fails."""
        if self.state is not State.NEW:
            raise QEMUError(f"launch() on a machine that is {self.state.value}")
        if self._hook_ours is not None:
            log.warning("QEMU has -open-hook-fd but nobody serves the hook: opens will hang")
        cfg = self.config
        self.argv = build_argv(
            cfg,
            qmp_fd=self._qmp_theirs.fileno(),
            hook_fd=self._hook_theirs.fileno() if self._hook_theirs else None,
            serial_fd=self._serial_theirs.fileno() if self._serial_theirs else None,
        )
        if not is_runnable(cfg.binary):
            self._release()
            raise LaunchError(
                f"cannot run {cfg.binary}: no such executable",
                argv=self.argv,
                exitcode=None,
                log="",
            )
        self.process = self._spawn()
        kvm = self._greet()
        self.accel_used = "kvm" if kvm.get("enabled") else "tcg"
        log.info("QEMU pid %d is up, accelerator %s", self.process.pid, self.accel_used)
        return self

    def _spawn(self) -> subprocess.Popen[bytes]:
        """Run ``self.argv`` with QEMU's ends of the socket pairs, which we then close."""
        cfg = self.config
        theirs = [s for s in (self._qmp_theirs, self._hook_theirs, self._serial_theirs) if s]
        pass_fds = tuple(s.fileno() for s in theirs) + cfg.pass_fds
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("launching: %s", " ".join(self.argv))
        self.state = State.RUNNING
        try:
            with open(self.log_path, "ab") as out:
                return subprocess.Popen(
                    self.argv,
                    pass_fds=pass_fds,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **dict(cfg.env)} if cfg.env else None,
                    cwd=cfg.cwd,
                )
        except OSError as err:
            self._release()
            raise LaunchError(
                f"cannot run {self.argv[0]}: {err}",
                argv=self.argv,
                exitcode=None,
                log=self.read_log(),
            ) from err
        finally:
            # QEMU has its ends now; ours must go or we never see EOF from it.
            for s in theirs:
                s.close()

    def _greet(self) -> dict[str, Any]:
        """QMP's greeting and capabilities, then ``query-kvm``; LaunchError if QEMU fails."""
        cfg = self.config
        try:
            self._run(
                self._qmp.connect(self._qmp_ours),
                cfg.launch_timeout,
                "the QMP greeting and capabilities negotiation",
            )
            kvm = self._run(self._qmp.execute("query-kvm"), cfg.command_timeout, "query-kvm")
        except (QMPError, OSError, EOFError, WaitTimeout) as err:
            exitcode = self._wait_exit(2.0)
            if exitcode is None:
                self._kill()
                exitcode = self._wait_exit(cfg.shutdown_timeout)
            self._release()
            if exitcode is None or isinstance(err, WaitTimeout):
                why = f"QEMU did not answer on QMP: {err}"
            else:
                why = "QEMU exited during startup"
            raise LaunchError(why, argv=self.argv, exitcode=exitcode, log=self.read_log()) from err
        assert isinstance(kvm, dict)
        return kvm

    # -- talking to it ---------------------------------------------------------

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command and return its result; errors raise QMPCommandError."""
        self._require_running(command)
        try:
            return self._run(
                self._qmp.execute(command, arguments or None),
                self.config.command_timeout,
                f"QMP {command}",
            )
        except ExecuteError as err:
            desc = err.error.error.desc
            raise QMPCommandError(command, arguments, err.error_class, desc) from err
        except QMPError as err:
            raise QEMUError(f"QMP {command} failed: {err}") from err

    def add_fd(self, fd: int, *, fdset_id: int | None = None, opaque: str | None = None) -> Any:
        """Upstream's way: pass ``fd`` with QMP ``add-fd`` into an fd set.

        The descriptor rides SCM_RIGHTS on the QMP socket together with the
        command; QEMU keeps its own copy, so the caller may close ``fd``.
        Returns QEMU's answer (``{"fdset-id": N, "fd": M}``).
        """
        self._require_running("add-fd")
        self._qmp.send_fd_scm(fd)
        args: dict[str, Any] = {}
        if fdset_id is not None:
            args["fdset-id"] = fdset_id
        if opaque is not None:
            args["opaque"] = opaque
        return self.qmp("add-fd", **args)

    def hmp(self, command_line: str) -> str:
        """Run an HMP command through ``human-monitor-command``; its output."""
        out = self.qmp("human-monitor-command", **{"command-line": command_line})
        assert isinstance(out, str)
        return out

    def qemu_io(self, device: str, command: str) -> str:
        """HMP ``qemu-io DEVICE "COMMAND"`` (e.g. ``read -P 0xab 0 512``); its output.

        qemu-io prints to QEMU's stdout, not to the monitor: the output is
        what the command added to the log (complete with ``line_buffered``).
        """
        if '"' in command:
            raise QEMUUsageError(f"qemu-io command {command!r} must not contain a double quote")
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        monitor = self.hmp(f'qemu-io {device} "{command}"')
        with open(self.log_path, "rb") as f:
            f.seek(start)
            printed = f.read().decode(errors="replace")
        return monitor + printed

    def read_bytes(self, device: str, offset: int, length: int) -> bytes:
        """Guest-visible bytes of ``device``, read with qemu-io ``read -v``."""
        out = self.qemu_io(device, f"read -v {offset} {length}")
        data = parse_qemu_io_dump(out)
        if len(data) != length:
            raise QEMUError(
                f"qemu-io read -v {offset} {length} on {device} gave "
                f"{len(data)} bytes; output:\n{out[-1000:]}"
            )
        return data

    def events(self, *, clear: bool = True) -> list[dict[str, Any]]:
        """The QMP events received so far (and forget them, unless ``clear`` is off)."""
        self._run(asyncio.sleep(0), 1.0, "pending QMP events")
        got = [dict(e) for e in (self._qmp.events.clear() if clear else [])]
        return got

    def read_log(self) -> str:
        """QEMU's stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- shutdown ----------------------------------------------------------------

    def shutdown(self) -> str:
        """``quit``, then kill if QEMU is still there; stop our brokers. Returns the method."""
        if self.state is not State.RUNNING:
            if self.state is State.NEW:
                self._release()
                self.state = State.STOPPED
            return self.shutdown_method or "never launched"
        method = "exited"
        if self.is_running():
            method = "quit"
            try:
                self._run(self._qmp.execute("quit"), self.config.shutdown_timeout, "QMP quit")
            except (QMPError, OSError, EOFError, WaitTimeout) as err:
                log.debug("quit failed: %r", err)
            if self._wait_exit(self.config.shutdown_timeout) is None:
                method = "kill"
                log.warning(
                    "QEMU pid %d did not quit within %gs: killing it",
                    self._pid(),
                    self.config.shutdown_timeout,
                )
                self._kill()
                if self._wait_exit(self.config.shutdown_timeout) is None:
                    raise WaitTimeout(
                        f"QEMU pid {self._pid()} to die after SIGKILL", self.config.shutdown_timeout
                    )
        self.exitcode = self.process.returncode if self.process else None
        self.shutdown_method = method
        log.info("QEMU shut down (%s), exit code %s", method, self.exitcode)
        self._release()
        return method

    def _release(self) -> None:
        self.state = State.STOPPED
        try:
            self._run(self._qmp.disconnect(), 5.0, "the QMP disconnect")
        except Exception as err:  # QEMU gone: the reader's EOFError lands here
            log.debug("QMP disconnect: %r", err)
        for s in (
            self._qmp_ours,
            self._qmp_theirs,
            self._hook_ours,
            self._hook_theirs,
            self._serial_ours,
            self._serial_theirs,
        ):
            if s is not None:
                s.close()
        for broker in self.brokers:
            broker.stop()
        for proc in self.helpers:
            try:
                proc.wait(self.config.shutdown_timeout)
            except subprocess.TimeoutExpired:
                log.warning("hook server pid %d still running after QEMU: killing it", proc.pid)
                proc.kill()
                proc.wait(self.config.shutdown_timeout)
        self._loop.close()

    def close(self) -> None:
        """Shut down, and remove the temporary log directory if we made one."""
        self.shutdown()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()

    def __enter__(self) -> Machine:
        return self.launch() if self.state is State.NEW else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    # -- internals ---------------------------------------------------------------

    def _run(self, aw: Any, timeout: float, what: str) -> Any:
        if self._loop.is_closed():
            raise QEMUError(f"{what}: the machine is shut down")
        try:
            return self._loop.run_until_complete(asyncio.wait_for(aw, timeout))
        except TimeoutError as err:
            raise WaitTimeout(what, timeout) from err

    def _require_running(self, what: str) -> None:
        if self.state is not State.RUNNING:
            raise QEMUError(f"{what}: the machine is {self.state.value}, not running")
        if not self.is_running():
            code = self.process.returncode if self.process else None
            raise QEMUError(
                f"{what}: QEMU has exited (code {code}); log tail:\n{self.read_log()[-2000:]}"
            )

    def _pid(self) -> int:
        return self.process.pid if self.process else -1

    def _wait_exit(self, timeout: float) -> int | None:
        if self.process is None:
            return None
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None or time.monotonic() >= deadline:
                return code
            time.sleep(0.02)

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()


def parse_qemu_io_dump(text: str) -> bytes:
    """The bytes in qemu-io's ``read -v`` hex dump (``OFFSET:  xx xx ... ascii``)."""
    data = bytearray()
    for line in text.splitlines():
        head, sep, rest = line.partition(":  ")
        if not sep or len(head) != 8 or any(c not in "0123456789abcdef" for c in head):
            continue
        # 16 "xx " groups, then the ASCII column
        for word in rest[:48].split():
            data.append(int(word, 16))
    return bytes(data)
