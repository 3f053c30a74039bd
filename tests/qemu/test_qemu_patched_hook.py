"""The hook's edges: startup checks, broken brokers, temp files, a broker process."""

from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path

import pytest
from qemu_images import PATTERN, Images

from testbed.broker import Broker, Policy
from testbed.errors import LaunchError
from testbed.qemu import QMPCommandError
from testbed.qemu.fixtures import MachineFactory

pytestmark = pytest.mark.qemu


@pytest.mark.parametrize(
    ("fd_kind", "message"),
    [
        ("pipe", "not a socket"),
        ("dgram", "not a stream socket"),
        ("stdin", "cannot be stdin"),
        ("word", "not a file descriptor number"),
    ],
)
def test_open_hook_fd_must_be_a_connected_unix_stream_socket(
    patched_qemu: MachineFactory, fd_kind: str, message: str
) -> None:
    keep: list[object] = []
    arg = ""
    if fd_kind == "word":
        fd, arg = -1, "three"
    elif fd_kind == "pipe":
        r, w = os.pipe()
        keep += [r, w]
        fd = r
    elif fd_kind == "dgram":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        keep += [a, b]
        fd = a.fileno()
    else:
        fd = 0
    arg = arg or str(fd)
    try:
        with pytest.raises(LaunchError) as info:
            patched_qemu("-open-hook-fd", arg, hook=False, pass_fds=(fd,) if fd > 2 else ())
        # error_report() prefixes the option and its argument itself: once
        assert f"-open-hook-fd {arg}: {message}" in info.value.log
        assert info.value.log.count("-open-hook-fd") == 1, info.value.log
        assert info.value.exitcode == 1
    finally:
        for k in keep:
            if isinstance(k, int):
                os.close(k)
            else:
                assert isinstance(k, socket.socket)
                k.close()


def test_a_reply_without_fd_is_a_protocol_error_and_the_hook_stays_failed(
    patched_qemu: MachineFactory, images: Images
) -> None:
    vm = patched_qemu(serve=False, launch=False)
    sock = vm.take_hook_socket()
    requests: list[bytes] = []

    def fake_broker() -> None:
        # Answers "success" but sends no descriptor: QEMU must refuse that.
        with sock:
            while data := sock.recv(65536):
                requests.append(data)
                sock.sendall(struct.pack("=IIi", 12, 1, 0))

    thread = threading.Thread(target=fake_broker, daemon=True)
    thread.start()
    vm.launch()
    with pytest.raises(QMPCommandError) as info:
        vm.qmp(
            "blockdev-add",
            driver="file",
            filename=str(images.raw),
            **{"node-name": "a", "read-only": True},
        )
    assert str(images.raw) in info.value.desc
    assert "open hook (-open-hook-fd) failed" in info.value.desc
    assert "Protocol error" in info.value.desc
    # The stream cannot be trusted any more: later opens fail without a request.
    with pytest.raises(QMPCommandError, match="not connected"):
        vm.qmp(
            "blockdev-add",
            driver="file",
            filename=str(images.raw),
            **{"node-name": "b", "read-only": True},
        )
    assert len(requests) == 1
    size, command, flags, mode, namelen = struct.unpack("=IIIIH", requests[0][:18])
    assert (size, command, namelen) == (18 + len(str(images.raw)), 1, len(str(images.raw)))
    assert requests[0][18:] == os.fsencode(str(images.raw))
    assert flags & os.O_ACCMODE == os.O_RDONLY and mode == 0
    assert vm.is_running()


def test_snapshot_temp_file_is_created_through_the_hook(
    patched_qemu: MachineFactory, images: Images, tmp_path: Path
) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    broker = Broker(Policy.from_grants(ro=[images.dir], create=[tmpdir])).start()
    try:
        vm = patched_qemu(
            "-snapshot",
            "-drive",
            f"file={images.qcow2},format=qcow2,if=none,id=drive0",
            broker=broker,
            env=(("TMPDIR", str(tmpdir)),),
            hide_dirs=(images.dir, tmpdir),
        )
        assert "Pattern verification failed" not in vm.qemu_io(
            "drive0", f"read -P {PATTERN:#x} 0 4096"
        )
        vm.qemu_io("drive0", "write -P 0x11 0 512")  # lands in the temporary overlay
        vm.shutdown()
        temp = [r for r in broker.records if Path(r.path).parent == tmpdir]
        assert temp, "no request for a temporary file"
        assert list(temp[0].flag_names)[:3] == ["O_RDWR", "O_CREAT", "O_EXCL"]
        assert temp[0].mode == 0o600 and temp[0].result == 0
        assert Path(temp[0].path).name.startswith("vl.")
        # The images themselves were only read.
        assert all(
            r.flag_names[0] == "O_RDONLY"
            for r in broker.records
            if Path(r.path).parent == images.dir
        )
    finally:
        broker.stop()


def test_broker_as_a_separate_process(
    patched_qemu: MachineFactory, images: Images, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    vm = patched_qemu(
        "-drive", f"file={images.qcow2},format=qcow2,if=none,id=drive0", serve=False, launch=False
    )
    vm.start_broker_process(
        ["--allow-create", str(images.dir), "--audit", str(audit)], log_path=tmp_path / "broker.log"
    )
    vm.launch()
    assert "Pattern verification failed" not in vm.qemu_io("drive0", f"read -P {PATTERN:#x} 0 4096")
    vm.shutdown()
    assert str(images.raw) in audit.read_text()


def test_relative_names_are_sent_joined_to_qemus_working_directory(
    patched_qemu: MachineFactory, broker: Broker, images: Images
) -> None:
    vm = patched_qemu(
        "-drive", f"file={images.qcow2.name},format=qcow2,if=none,id=drive0", cwd=images.dir
    )
    # a relative file that exists opens (its backing name is relative to it, as before)
    assert "Pattern verification failed" not in vm.qemu_io("drive0", f"read -P {PATTERN:#x} 0 4096")
    # qemu-iotests 051: a missing relative name is QEMU's own ENOENT, not the broker's EACCES
    with pytest.raises(QMPCommandError) as info:
        vm.qmp("blockdev-add", driver="file", filename="foo:bar", **{"node-name": "fb"})
    assert "Could not open 'foo:bar': No such file or directory" in info.value.desc
    paths = [r.path for r in broker.records]
    assert f"{images.dir}/{images.qcow2.name}" in paths
    assert f"{images.dir}/foo:bar" in paths
    assert all(p.startswith("/") for p in paths), paths
