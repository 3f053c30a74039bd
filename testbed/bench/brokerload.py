"""Servers in their own processes, and N client processes that load them.

The broker is started the way a user starts it (``python -m testbed broker
--socket PATH --allow-ro DIR``, :class:`BrokerProcess`); a server that
serves one inherited socket (the Python floor, the series' C
``open-hook-server``, ``testbed broker --fd``) runs as a
:class:`SpawnedServer` on one end of a socketpair.  Either is pinned where
the placement says and fed by forked clients (:mod:`testbed.bench.client`).  All clients start and
stop on the same CLOCK_MONOTONIC instants, so the aggregate ops/s is the
sum of their ops over one shared window.  The broker's CPU time per op
comes from ``/proc/PID/task/*/schedstat`` (nanoseconds, every thread).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from types import TracebackType
from typing import Protocol

from testbed.bench.client import ClientConfig, serve_harness
from testbed.bench.placement import pin
from testbed.bench.stats import RunFigures, run_figures
from testbed.errors import BenchUsageError, BrokerBenchError, WaitTimeout


def broker_argv(socket_path: str, allow_ro: Path) -> list[str]:
    """How the bench starts the broker: the project's own CLI, no audit file."""
    return [
        sys.executable, "-m", "testbed", "broker",
        "--socket", socket_path, "--allow-ro", str(allow_ro),
    ]  # fmt: skip


def task_cpu_ns(pid: int) -> int:
    """CPU time so far of every thread of ``pid``, in nanoseconds."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended between listing and reading
    return total


class BrokerProcess:
    """The broker serving on a UNIX socket in a private short directory."""

    client_fd: int | None = None  # clients connect to socket_path

    def __init__(
        self, allow_ro: Path, *, cpu: int | None,
        command: Callable[[str, Path], Sequence[str]] = broker_argv, start_timeout: float = 20.0,
    ) -> None:  # fmt: skip
        self._dir = tempfile.TemporaryDirectory(prefix="tbb.")
        self.socket_path = os.path.join(self._dir.name, "s")
        cmd = list(command(self.socket_path, allow_ro))
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the broker
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_listening(start_timeout)
            self.pin(cpu)
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerBenchError(
                    f"broker exited {self.proc.returncode} at start: {self.log()}"
                )
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.socket_path)
                return
            except OSError:
                time.sleep(0.05)
            finally:
                probe.close()
        raise WaitTimeout(f"the broker to listen on {self.socket_path}", timeout)

    def pin(self, cpu: int | None) -> None:
        """Move every thread of the broker to ``cpu`` (``None``: anywhere)."""
        for task in os.listdir(f"/proc/{self.proc.pid}/task"):
            pin(int(task), cpu)  # a thread's mask is its own, the pid's alone is not enough

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-2000:]

    def cpu_ns(self) -> int:
        return task_cpu_ns(self.proc.pid)

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._log.close()
        self._dir.cleanup()

    def __enter__(self) -> BrokerProcess:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class SpawnedServer:
    """A server process serving one inherited socket; ``client_fd`` is the other end.

    ``argv`` holds ``{fd}`` where the server's descriptor number goes.  The
    server is expected to exit when its peer hangs up.
    """

    socket_path: str | None = None

    def __init__(self, argv: Sequence[str], *, cpu: int | None) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._client: socket.socket | None = ours
        self.argv = [w.replace("{fd}", str(theirs.fileno())) for w in argv]
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        try:
            self.proc = subprocess.Popen(
                self.argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=self._log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        except OSError as err:
            ours.close()
            raise BrokerBenchError(f"cannot start {self.argv[0]}: {err}") from err
        finally:
            theirs.close()
        self.pin(cpu)

    @property
    def client_fd(self) -> int | None:
        return None if self._client is None else self._client.fileno()

    def release_client(self) -> None:
        """Drop our copy of the client end (the forked client holds its own)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def pin(self, cpu: int | None) -> None:
        for task in os.listdir(f"/proc/{self.proc.pid}/task"):
            with contextlib.suppress(OSError):
                pin(int(task), cpu)

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-2000:]

    def cpu_ns(self) -> int:
        return task_cpu_ns(self.proc.pid)

    def stop(self, timeout: float = 5.0) -> None:
        self.release_client()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        self._log.close()


class Served(Protocol):
    """What a client pool needs from the server it loads."""

    @property
    def socket_path(self) -> str | None: ...
    @property
    def client_fd(self) -> int | None: ...
    def log(self) -> str: ...
    def cpu_ns(self) -> int: ...


class ClientPool:
    """N forked client processes connected to one server, run in timed rounds."""

    def __init__(
        self, n: int, broker: Served, file: Path, *, cpu: int | None, warmup: int,
        ready_timeout: float = 60.0,
    ) -> None:  # fmt: skip
        if n < 1:
            raise BenchUsageError(f"client count {n} < 1")
        if broker.socket_path is None and n != 1:
            raise BenchUsageError(f"a server on one inherited socket takes one client, not {n}")
        self.broker = broker
        ctx = multiprocessing.get_context("fork")
        config = ClientConfig(
            socket_path=broker.socket_path, fd=broker.client_fd, file=str(file),
            warmup=warmup, cpu=cpu,
        )  # fmt: skip
        self._conns: list[Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        try:
            for _ in range(n):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=serve_harness, args=(theirs, config), daemon=True)
                proc.start()
                theirs.close()
                self._conns.append(ours)
                self._procs.append(proc)
            if isinstance(broker, SpawnedServer):
                broker.release_client()  # or the server never sees its client leave
            self._collect("ready", ready_timeout, f"{n} clients to connect and warm up")
        except BaseException:
            self.close()
            raise

    def _collect(self, expected: str, timeout: float, what: str) -> list[object]:
        """One ``expected`` message from every client, within ``timeout``."""
        deadline = time.monotonic() + timeout
        answers: dict[int, object] = {}
        pending = dict(enumerate(self._conns))
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(what, timeout)
            for ready in wait(list(pending.values()), timeout=left):
                index = next(i for i, c in pending.items() if c is ready)
                conn = pending[index]
                try:
                    kind, payload = conn.recv()
                except EOFError as err:
                    raise BrokerBenchError(
                        f"client {index} died; server log: {self.broker.log()}"
                    ) from err
                if kind != expected:
                    raise BrokerBenchError(
                        f"client {index}: {payload}; server log: {self.broker.log()}"
                    )
                answers[index] = payload
                del pending[index]
        return [answers[i] for i in range(len(self._conns))]

    def round(self, seconds: float) -> RunFigures:
        """All clients run for ``seconds``; the aggregate figures of that window."""
        start = time.monotonic_ns() + 50_000_000  # time for every client to get the message
        stop = start + int(seconds * 1e9)
        for conn in self._conns:
            conn.send(("go", start, stop))
        # sample the broker's CPU clock as close to the window as we can
        time.sleep(max(0.0, (start - time.monotonic_ns()) / 1e9))
        cpu0 = self.broker.cpu_ns()
        answers = self._collect("done", seconds + 30, f"{len(self._conns)} clients' round")
        cpu1 = self.broker.cpu_ns()
        latencies: list[int] = []
        longest = 0.0
        for payload in answers:
            assert isinstance(payload, tuple)
            _, elapsed, raw = payload
            samples = memoryview(raw).cast("Q")
            latencies.extend(samples)
            longest = max(longest, elapsed)
        return run_figures(latencies, longest, broker_cpu_s=(cpu1 - cpu0) / 1e9)

    def close(self, timeout: float = 5.0) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):  # that client may be gone already
                conn.send(("exit", 0, 0))
        for proc in self._procs:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout)
        for conn in self._conns:
            conn.close()

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
