"""Transports 4 and 5: fd passing and ``blockdev-add`` against a real QEMU.

- ``qmp_add_fd``: per op, open the file (as libvirt would), send it with
  SCM_RIGHTS, ``add-fd`` it, ``remove-fd`` it, close our copy: upstream's way
  of handing QEMU one fd.
- ``blockdev_add_path`` / ``blockdev_add_fdset`` / ``blockdev_add_hook``:
  per op, ``blockdev-add`` of a read-only ``file`` node then ``blockdev-del``;
  by path in stock QEMU, through ``/dev/fdset/N`` (one fd added beforehand),
  and by path in the patched QEMU whose every open goes to the broker.

QEMU runs with ``-machine none`` (no guest, no firmware) and its QMP monitor
on a socketpair, so no socket path can be too long and nothing else on the
machine can talk to it.

The three ``blockdev_add_*`` transports run under the project's machine
wrapper (:class:`testbed.qemu.machine.Machine`; for the hook, a broker in
its own process, ``python -m testbed broker --fd N``), so they differ only
in how the file reaches QEMU.  ``qmp_add_fd`` talks to QEMU with a bare
``qemu.qmp`` client instead: the wrapper's synchronous calls add about
100 us per command, and upstream's mechanism is measured without that.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import QMPClient

from testbed.bench.stats import RunFigures, percentile, run_figures
from testbed.errors import LaunchError, WaitTimeout
from testbed.qemu import binaries
from testbed.qemu.commandline import MachineConfig
from testbed.qemu.machine import Machine

STOCK_QEMU = str(binaries.STOCK_QEMU)
PATCHED_QEMU = str(binaries.patched_qemu_path())
FDSET_ID = 7
COMMAND_TIMEOUT = 10.0  # per QMP command: a wedged QEMU must not hang the bench


@dataclass(frozen=True, kw_only=True)
class QmpRun:
    """One repetition: whole-op figures plus the ``blockdev-add`` half alone."""

    figures: RunFigures
    add_p50_us: float | None = None


@contextlib.asynccontextmanager
async def qemu_with_qmp(binary: str, *, start_timeout: float = 30.0) -> AsyncIterator[QMPClient]:
    """A ``-machine none`` QEMU with a bare QMP client on a socketpair."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [
        binary, "-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg",
        "-chardev", f"socket,id=qmp,fd={theirs.fileno()}", "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()], stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip
    theirs.close()
    qmp = QMPClient("bench")
    try:
        try:
            await asyncio.wait_for(qmp.connect(ours), start_timeout)
        except (TimeoutError, OSError, Exception) as err:
            proc.kill()
            proc.wait(5)
            log.seek(0)
            raise LaunchError(
                f"QEMU's QMP greeting did not come: {err}",
                argv=argv, exitcode=proc.returncode, log=log.read().decode("utf-8", "replace"),
            ) from err  # fmt: skip
        yield qmp
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(qmp.execute("quit"), COMMAND_TIMEOUT)
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        ours.close()


async def execute(qmp: QMPClient, cmd: str, args: dict[str, object] | None = None) -> object:
    try:
        return await asyncio.wait_for(qmp.execute(cmd, args), COMMAND_TIMEOUT)
    except TimeoutError as err:
        raise WaitTimeout(f"QEMU's answer to {cmd}", COMMAND_TIMEOUT) from err


async def add_fd_op(qmp: QMPClient, file: Path) -> None:
    fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        qmp.send_fd_scm(fd)
        answer = await execute(qmp, "add-fd", {"fdset-id": FDSET_ID})
    finally:
        os.close(fd)
    assert isinstance(answer, dict)
    await execute(qmp, "remove-fd", {"fdset-id": FDSET_ID, "fd": answer["fd"]})


def _figures(latencies: list[int], seconds: float, parts: list[float]) -> QmpRun:
    add_p50 = percentile(sorted(parts), 50) / 1000 if parts else None
    return QmpRun(figures=run_figures(latencies, seconds), add_p50_us=add_p50)


async def timed_ops(op: Callable[[], Awaitable[float | None]], *, ops: int, warmup: int) -> QmpRun:
    """``warmup`` then ``ops`` awaits of ``op``; ``op`` may return its own sub-timing."""
    for _ in range(warmup):
        await op()
    latencies: list[int] = []
    parts: list[float] = []
    begin = t0 = time.monotonic_ns()
    for _ in range(ops):
        part = await op()
        t1 = time.monotonic_ns()
        latencies.append(t1 - t0)
        if part is not None:
            parts.append(part)
        t0 = t1
    return _figures(latencies, (t0 - begin) / 1e9, parts)


def timed_sync_ops(op: Callable[[], float], *, ops: int, warmup: int) -> QmpRun:
    """:func:`timed_ops` for a blocking ``op``: the machine wrapper runs its own
    event loop for each call, so its calls cannot be awaited inside another."""
    for _ in range(warmup):
        op()
    latencies: list[int] = []
    parts: list[float] = []
    begin = t0 = time.monotonic_ns()
    for _ in range(ops):
        parts.append(op())
        t1 = time.monotonic_ns()
        latencies.append(t1 - t0)
        t0 = t1
    return _figures(latencies, (t0 - begin) / 1e9, parts)


async def add_fd_runs(binary: str, file: Path, *, reps: int, ops: int, warmup: int) -> list[QmpRun]:
    """Repetitions of add-fd + remove-fd against one QEMU."""
    async with qemu_with_qmp(binary) as qmp:

        async def op() -> None:
            await add_fd_op(qmp, file)

        return [await timed_ops(op, ops=ops, warmup=warmup) for _ in range(reps)]


def blockdev_runs(
    binary: str, file: Path, *, via: str, reps: int, ops: int, warmup: int
) -> list[QmpRun]:
    """Repetitions of blockdev-add + blockdev-del of a read-only ``file`` node.

    ``via`` is how the file reaches QEMU: ``path`` (QEMU opens it),
    ``fdset`` (one fd added beforehand, the node names ``/dev/fdset/N``) or
    ``hook`` (QEMU asks a broker process granted ``file``'s directory; needs
    the patched ``binary``).  Every variant runs under the machine wrapper.
    """
    if via not in ("path", "fdset", "hook"):
        raise ValueError(f"blockdev-add via {via!r}: expected path, fdset or hook")
    config = MachineConfig(
        binary=Path(binary), hook=via == "hook", line_buffered=False,
        command_timeout=COMMAND_TIMEOUT,
    )  # fmt: skip
    vm = Machine(config)
    if via == "hook":
        vm.start_broker_process(["--allow-ro", str(file.parent)])
    filename = str(file)
    with vm:
        if via == "fdset":
            fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
            try:
                vm.add_fd(fd, fdset_id=FDSET_ID)
            finally:
                os.close(fd)
            filename = f"/dev/fdset/{FDSET_ID}"
        node = {"driver": "file", "filename": filename, "node-name": "bench", "read-only": True}

        def op() -> float:
            t0 = time.monotonic_ns()
            vm.qmp("blockdev-add", **node)
            added = time.monotonic_ns() - t0
            vm.qmp("blockdev-del", **{"node-name": "bench"})
            return float(added)

        return [timed_sync_ops(op, ops=ops, warmup=warmup) for _ in range(reps)]
