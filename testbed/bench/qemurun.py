"""Start a QEMU for a measurement and time it to its QMP greeting.

QEMU runs with ``-machine none -S`` (no guest, no firmware, stopped), its
QMP monitor on a socketpair (no socket path, nothing else can talk to it),
and whatever the transport adds (:class:`Launch`).  The greeting is timed
from just before the spawn to the moment the first byte of the greeting is
readable on our end, so the figure is QEMU's start-up, every open of the
command line included, and not qemu.qmp's capabilities negotiation (which
follows).  Every client of one run uses this launcher, so transports differ
only in how the files reach QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from qemu.qmp import QMPClient

from testbed.bench.brokerload import task_cpu_ns
from testbed.errors import LaunchError, QEMUError, SuperviseError, WaitTimeout

COMMAND_TIMEOUT = 20.0  # per QMP command: a wedged QEMU must not hang the bench

#: What starts QEMU: ``subprocess.Popen`` itself, or a supervisor's ``popen``.
Popener = Callable[..., "subprocess.Popen[bytes]"]


def _nothing() -> None:
    pass


class CpuMeter(Protocol):
    """A process whose CPU time the bench reads: a broker, a C server."""

    def cpu_ns(self) -> int: ...


@dataclass(kw_only=True)
class Launch:
    """What a transport adds to one QEMU's command line, and what it holds meanwhile.

    ``names`` maps a file the experiment will hand QEMU later (``blockdev-add``,
    a snapshot overlay) to the name QEMU must be given for it.
    ``spawned`` runs right after the spawn (close the harness's copies of
    descriptors QEMU inherited); ``finished`` after QEMU has exited.
    ``popen`` starts the process (``subprocess.Popen``'s arguments): the
    seccomp transports start QEMU through their supervisor's.  ``server`` is
    the process that serves this QEMU's opens, if it is one of its own
    (a broker, a C server), for the CPU it spends on them.
    """

    args: tuple[str, ...] = ()
    pass_fds: tuple[int, ...] = ()
    hook_fd: int | None = None
    names: dict[Path, str] = field(default_factory=dict)
    spawned: Callable[[], None] = _nothing
    finished: Callable[[], None] = _nothing
    popen: Popener = subprocess.Popen
    server: CpuMeter | None = None

    def name(self, path: Path) -> str:
        return self.names.get(path, str(path))


def argv_for(binary: Path, launch: Launch, qmp_fd: int) -> list[str]:
    argv = [
        str(binary), "-nodefaults", "-display", "none", "-machine", "none", "-accel", "tcg",
        "-S", "-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip
    if launch.hook_fd is not None:
        argv += ["-open-hook-fd", str(launch.hook_fd)]
    return argv + list(launch.args)


class Spawned:
    """A QEMU process and our end of its QMP socketpair, before or after the greeting."""

    def __init__(self, binary: Path, launch: Launch) -> None:
        self.launch = launch
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.argv = argv_for(binary, launch, theirs.fileno())
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        fds = (
            theirs.fileno(),
            *launch.pass_fds,
            *(() if launch.hook_fd is None else (launch.hook_fd,)),
        )
        self.t0 = time.monotonic()
        try:
            self.proc = launch.popen(
                self.argv, pass_fds=fds, stdin=subprocess.DEVNULL, stdout=self.log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        except SuperviseError:
            self.sock.close()
            self.log.close()
            launch.finished()
            raise
        except OSError as err:
            self.sock.close()
            self.log.close()
            launch.finished()
            raise LaunchError(f"cannot run {binary}: {err}", argv=self.argv, exitcode=None,
                              log="") from err  # fmt: skip
        finally:
            theirs.close()
            launch.spawned()
        self.greeting_s: float | None = None

    def read_log(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")[-3000:]

    async def greeted(self, timeout: float) -> float:
        """Seconds from spawn until the greeting's first byte is readable."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = self.sock.fileno()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(ready, timeout)
        except TimeoutError as err:
            raise self.failure(f"no QMP greeting within {timeout:g}s", err) from err
        finally:
            loop.remove_reader(fd)
        self.greeting_s = time.monotonic() - self.t0
        if self.proc.poll() is not None:
            raise self.failure("QEMU exited at start-up", None)
        return self.greeting_s

    def failure(self, why: str, err: BaseException | None) -> LaunchError:
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait(10)
        return LaunchError(why + (f": {err}" if err else ""), argv=self.argv, exitcode=code,
                           log=self.read_log())  # fmt: skip

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (QEMU exits cleanly on it), then SIGKILL; release what the launch held."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.sock.close()
        self.log.close()
        self.launch.finished()


class Qemu:
    """A started QEMU with a qemu.qmp client."""

    def __init__(self, spawned: Spawned, qmp: QMPClient) -> None:
        self.spawned = spawned
        self.qmp = qmp

    @property
    def greeting_s(self) -> float:
        assert self.spawned.greeting_s is not None
        return self.spawned.greeting_s

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return await asyncio.wait_for(self.qmp.execute(cmd, args), COMMAND_TIMEOUT)
        except TimeoutError as err:
            raise WaitTimeout(f"QEMU's answer to {cmd}", COMMAND_TIMEOUT) from err
        except Exception as err:
            raise QEMUError(f"QMP {cmd} {args}: {err}; log: {self.spawned.read_log()}") from err

    async def timed(self, cmd: str, args: dict[str, Any] | None = None) -> float:
        """Seconds one command took, round trip."""
        t0 = time.monotonic()
        await self.execute(cmd, args)
        return time.monotonic() - t0

    def send_fd(self, fd: int) -> None:
        self.qmp.send_fd_scm(fd)

    def cpu_ns(self) -> int:
        """CPU time so far of every thread of the QEMU process."""
        return task_cpu_ns(self.spawned.proc.pid)


@contextlib.asynccontextmanager
async def started(binary: Path, launch: Launch, *, timeout: float = 60.0) -> AsyncIterator[Qemu]:
    """A QEMU up to its greeting and QMP negotiated; stopped on exit from the block."""
    spawned = Spawned(binary, launch)
    qmp = QMPClient("bench")
    try:
        await spawned.greeted(timeout)
        try:
            await asyncio.wait_for(qmp.connect(spawned.sock), timeout)
        except Exception as err:
            raise spawned.failure("QMP negotiation failed", err) from err
        yield Qemu(spawned, qmp)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(qmp.disconnect(), 5)
        spawned.stop()


async def storm(binary: Path, launches: Sequence[Launch], *, timeout: float = 120.0) -> float:
    """Spawn every launch at once; seconds from the first spawn until all have greeted."""
    qemus: list[Spawned] = []
    try:
        t0 = time.monotonic()
        for i, launch in enumerate(launches):
            try:
                qemus.append(Spawned(binary, launch))
            except BaseException:
                for rest in launches[i + 1 :]:  # never spawned: release what they hold
                    rest.spawned()
                    rest.finished()
                raise
        await asyncio.gather(*(q.greeted(timeout) for q in qemus))
        last = max(q.t0 + (q.greeting_s or 0.0) for q in qemus)
        return last - t0
    finally:
        for q in qemus:
            with contextlib.suppress(Exception):
                q.proc.terminate()
        for q in qemus:
            q.stop()


def close_quietly(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
