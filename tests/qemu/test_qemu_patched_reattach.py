"""A broker that dies is replaced in a running QEMU (patch 0007: QMP open-hook-set).

The scenario of a libvirt restart: the broker process is SIGKILLed while
QEMU runs; an operation that needs an open fails with the hook's error and
``query-open-hook`` says ``broken``; a new broker (``testbed broker --fd`` or
``--socket``) is attached over QMP; the next snapshot succeeds.  The two
audit logs together must be the trace one broker sees for the same work
without the kill: every open accounted for, none lost, none twice.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu_images import PATTERN, Images, make_images, select_opens

from testbed.broker import Broker, Policy, read_audit
from testbed.qemu import Machine
from testbed.qemu.fixtures import MachineFactory
from testbed.qemu.machine import QMPCommandError

pytestmark = pytest.mark.qemu

log = logging.getLogger(__name__)

HOOK_FAILED = "the open hook (-open-hook-fd) failed"


def drive(images: Images) -> tuple[str, str]:
    return ("-drive", f"file={images.qcow2},format=qcow2,if=none,id=drive0")


def snapshot(vm: Machine, overlay: Path) -> None:
    vm.qmp(
        "blockdev-snapshot-sync", device="drive0", **{"snapshot-file": str(overlay)}, format="qcow2"
    )


def hook_info(vm: Machine) -> dict[str, object]:
    info = vm.qmp("query-open-hook")
    assert isinstance(info, dict)
    return info


def check_data(vm: Machine) -> None:
    out = vm.qemu_io("drive0", f"read -P {PATTERN:#x} 0 4096")
    assert "read 4096/4096 bytes" in out
    assert "Pattern verification failed" not in out


def broker_args(images: Images, audit: Path) -> list[str]:
    return ["--allow-create", str(images.dir), "--audit", str(audit)]


def reference_opens(patched_qemu: MachineFactory, tmp_path: Path) -> list[tuple[str, str]]:
    """The same work (read, snapshot, quit) with one broker that never dies."""
    (tmp_path / "reference").mkdir()
    ref = make_images(tmp_path / "reference")
    broker = Broker(Policy.from_grants(create=[ref.dir]))
    vm = patched_qemu(*drive(ref), broker=broker.start())
    try:
        check_data(vm)
        snapshot(vm, ref.dir / "snap.qcow2")
        assert vm.shutdown() == "quit"
    finally:
        broker.stop()
    return select_opens(broker.records, ref.dir)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory for a UNIX socket: tmp_path can exceed the 107-byte limit."""
    with tempfile.TemporaryDirectory(prefix="reattach-", dir="/tmp") as d:
        yield Path(d)


def start_socket_broker(
    path: Path, images: Images, audit: Path, log_path: Path
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "testbed",
                "broker",
                "--socket",
                str(path),
                *broker_args(images, audit),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )


@pytest.mark.parametrize("replacement", ["fd", "socket"])
def test_killed_broker_is_replaced(
    replacement: str,
    patched_qemu: MachineFactory,
    images: Images,
    tmp_path: Path,
    short_dir: Path,
) -> None:
    first_audit, second_audit = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    vm = patched_qemu(*drive(images), serve=False, launch=False)
    pid = vm.start_broker_process(broker_args(images, first_audit), log_path=tmp_path / "first.log")
    vm.launch()
    check_data(vm)
    assert hook_info(vm)["state"] == "connected"

    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    next(p for p in vm.helpers if p.pid == pid).wait(10)
    overlay = images.dir / "snap.qcow2"
    with pytest.raises(QMPCommandError) as failed:
        snapshot(vm, overlay)
    assert HOOK_FAILED in failed.value.desc
    assert str(overlay) in failed.value.desc
    assert not overlay.exists()
    before = read_audit(first_audit)
    info = hook_info(vm)
    assert info["state"] == "broken"
    assert info["requests"] == len(before)
    failures = info["failures"]
    assert isinstance(failures, int) and failures >= 1
    assert str(overlay) in str(info["last-error"])  # what broke it: the first open
    # Broken stays broken (the stream may be out of step) until a new broker,
    # and refuses at once: nothing to wait for, the last error is kept.
    with pytest.raises(QMPCommandError) as again:
        snapshot(vm, overlay)
    assert HOOK_FAILED in again.value.desc
    info = hook_info(vm)
    assert info["failures"] > failures
    assert info["requests"] == len(before)
    last_error, failures = info["last-error"], info["failures"]

    server = None
    if replacement == "fd":
        vm.reattach_broker_process(
            broker_args(images, second_audit), log_path=tmp_path / "second.log"
        )
    else:
        path = short_dir / "hook.sock"
        server = start_socket_broker(path, images, second_audit, tmp_path / "second.log")
        vm.reattach_broker_socket(path)
    try:
        reattached = time.monotonic()
        snapshot(vm, overlay)
        done = time.monotonic()
        log.info(
            "reattach (%s): kill to open-hook-set %.0f ms, to first successful snapshot %.0f ms",
            replacement,
            (reattached - killed) * 1000,
            (done - killed) * 1000,
        )
        assert overlay.exists()
        check_data(vm)  # through the new overlay over the old top
        info = hook_info(vm)
        assert info["state"] == "connected"
        assert info["reattached"] == 1
        assert info["failures"] == failures
        assert info["last-error"] == last_error  # kept after the reattach
        assert vm.shutdown() == "quit"
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
    after = read_audit(second_audit)
    assert after, "the new broker answered nothing"
    assert all(r.peer_pid != pid for r in after)
    combined = select_opens([*before, *after], images.dir)
    assert combined == reference_opens(patched_qemu, tmp_path)
    assert all(r.result in (0, -errno.ENOENT) for r in [*before, *after])  # probes: ENOENT


def test_live_broker_is_replaced(patched_qemu: MachineFactory, images: Images) -> None:
    policy = Policy.from_grants(create=[images.dir])
    old = Broker(policy).start()
    vm = patched_qemu(*drive(images), broker=old)
    try:
        check_data(vm)
        served = len(old.records)
        new = vm.reattach_broker(policy)
        snapshot(vm, images.dir / "snap.qcow2")
        assert len(old.records) == served  # nothing reached the old broker
        assert any(r.path == str(images.dir / "snap.qcow2") for r in new.records)
        info = hook_info(vm)
        assert info == {
            "state": "connected",
            "requests": served + len(new.records),
            "failures": 0,
            "reattached": 1,
        }
    finally:
        vm.shutdown()
        old.stop()


def test_stopped_broker_is_replaced_and_its_socket_closed(
    patched_qemu: MachineFactory, images: Images, tmp_path: Path
) -> None:
    """open-hook-set does not wait for the old broker, and closes its socket."""
    audit = tmp_path / "old.jsonl"
    vm = patched_qemu(*drive(images), serve=False, launch=False)
    pid = vm.start_broker_process(broker_args(images, audit), log_path=tmp_path / "old.log")
    vm.launch()
    check_data(vm)
    old = next(p for p in vm.helpers if p.pid == pid)
    os.kill(pid, signal.SIGSTOP)
    try:
        new = vm.reattach_broker(Policy.from_grants(create=[images.dir]))
        snapshot(vm, images.dir / "snap.qcow2")
        assert any(r.path == str(images.dir / "snap.qcow2") for r in new.records)
    finally:
        os.kill(pid, signal.SIGCONT)
    # Its only connection is gone, so the --fd broker exits on its own.
    assert old.wait(10) == 0
    assert all(r.path != str(images.dir / "snap.qcow2") for r in read_audit(audit))
    assert hook_info(vm)["failures"] == 0


def _unconnected() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)


def _datagram() -> socket.socket:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.close()
    return a


class _FdHolder:
    """Quacks like a socket for Machine.reattach_hook: fileno() and close()."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("file", "not a UNIX stream socket"),
        ("datagram", "not a UNIX stream socket"),
        ("unconnected", "socket is not connected"),
    ],
)
def test_open_hook_set_refuses_what_is_not_a_broker_socket(
    kind: str,
    message: str,
    patched_qemu: MachineFactory,
    broker: Broker,
    images: Images,
    tmp_path: Path,
) -> None:
    vm = patched_qemu(*drive(images))
    sock = {
        "file": lambda: _FdHolder(os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT, 0o600)),
        "datagram": _datagram,
        "unconnected": _unconnected,
    }[kind]()
    with pytest.raises(QMPCommandError) as refused:
        vm.reattach_hook(sock)  # type: ignore[arg-type]
    assert message in refused.value.desc
    assert "open-hook-set" in refused.value.desc
    # The old broker still serves, and nothing counts as a failure.
    snapshot(vm, images.dir / "snap.qcow2")
    assert any(r.path == str(images.dir / "snap.qcow2") for r in broker.records)
    info = hook_info(vm)
    assert (info["state"], info["failures"], info["reattached"]) == ("connected", 0, 0)
    # The refused descriptor was closed in QEMU: the name is gone.
    with pytest.raises(QMPCommandError, match=r"(not been|not) found"):
        vm.qmp("open-hook-set", fdname="testbed-open-hook-1")


def test_open_hook_set_needs_a_hooked_qemu(patched_qemu: MachineFactory, images: Images) -> None:
    vm = patched_qemu(*drive(images), hook=False)
    assert hook_info(vm) == {"state": "none", "requests": 0, "failures": 0, "reattached": 0}
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, pytest.raises(QMPCommandError) as refused:
        vm.reattach_hook(theirs)
    assert "not started with -open-hook-fd" in refused.value.desc
    snapshot(vm, images.dir / "snap.qcow2")  # QEMU still opens files itself
    assert hook_info(vm)["state"] == "none"


def test_unknown_fdname_is_refused(
    patched_qemu: MachineFactory, broker: Broker, images: Images
) -> None:
    vm = patched_qemu(*drive(images))
    with pytest.raises(QMPCommandError, match="nobroker"):
        vm.qmp("open-hook-set", fdname="nobroker")
    assert hook_info(vm)["state"] == "connected"
