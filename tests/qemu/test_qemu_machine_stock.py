"""The machine wrapper with each version's stock QEMU (Debian's for 7.2): no patched build."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from testbed.errors import LaunchError, QEMUError
from testbed.pytest_plugin import missing
from testbed.qemu import Machine, MachineConfig, QMPCommandError
from testbed.qemu.fixtures import MachineFactory

pytestmark = pytest.mark.stock_qemu


def make_raw(path: Path, byte: int, size: int = 1 << 20) -> Path:
    path.write_bytes(bytes([byte]) * 4096 + bytes(size - 4096))
    return path


def test_launch_qmp_hmp_and_quit(stock_qemu: MachineFactory, qemu_version: str) -> None:
    vm = stock_qemu()
    assert vm.accel_used == "tcg"
    assert vm.qmp("query-status")["status"] == "running"
    assert vm.hmp("info version").startswith(f"{qemu_version}.")
    with pytest.raises(QMPCommandError) as info:
        vm.qmp("no-such-command")
    assert info.value.error_class == "CommandNotFound"
    assert vm.shutdown() == "quit"
    assert vm.exitcode == 0
    with pytest.raises(QEMUError, match="stopped"):
        vm.qmp("query-status")


def test_qemu_io_reads_a_drive(stock_qemu: MachineFactory, tmp_path: Path) -> None:
    img = make_raw(tmp_path / "a.raw", 0xAB)
    vm = stock_qemu("-drive", f"file={img},format=raw,if=none,id=drive0")
    assert "Pattern verification failed" not in vm.qemu_io("drive0", "read -P 0xab 0 512")
    assert "Pattern verification failed" in vm.qemu_io("drive0", "read -P 0xcd 0 512")


def test_launch_error_on_a_bad_option_has_argv_code_and_log(tmp_path: Path) -> None:
    vm = Machine(MachineConfig(args=("-no-such-option",), log_path=tmp_path / "q.log"))
    with pytest.raises(LaunchError) as info:
        vm.launch()
    assert info.value.exitcode == 1
    assert "-no-such-option" in info.value.argv
    assert "invalid option" in info.value.log


def test_launch_error_on_a_missing_binary(tmp_path: Path) -> None:
    vm = Machine(MachineConfig(binary=tmp_path / "nope", log_path=tmp_path / "q.log"))
    with pytest.raises(LaunchError, match="cannot run") as info:
        vm.launch()
    assert info.value.exitcode is None


def test_stock_qemu_does_not_know_open_hook_fd(tmp_path: Path) -> None:
    vm = Machine(MachineConfig(args=("-open-hook-fd", "3"), log_path=tmp_path / "q.log"))
    with pytest.raises(LaunchError, match="exited during startup") as info:
        vm.launch()
    assert "-open-hook-fd" in info.value.log


def test_launch_timeout_names_what_it_waited_for(tmp_path: Path) -> None:
    # -S with an unserved hook is patched-only; a stock QEMU that never
    # answers QMP: '-chardev' for the monitor waits for... nothing.  Use a
    # fake "QEMU" that just sleeps instead.
    fake = tmp_path / "fake-qemu"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    vm = Machine(
        MachineConfig(
            binary=fake, launch_timeout=0.5, shutdown_timeout=2, log_path=tmp_path / "q.log"
        )
    )
    with pytest.raises(LaunchError, match="QMP greeting") as info:
        vm.launch()
    assert info.value.exitcode is not None  # it was killed, and reaped


def test_serial_console_socket(stock_qemu: MachineFactory) -> None:
    vm = stock_qemu(serial=True)
    assert vm.console_socket.fileno() >= 0
    assert "ser0" in " ".join(vm.argv)
    chardevs = {c["label"] for c in vm.qmp("query-chardev")}
    assert {"qmp", "ser0"} <= chardevs


def test_hidden_directory_is_empty_for_qemu(stock_qemu: MachineFactory, tmp_path: Path) -> None:
    if subprocess.run(["unshare", "--mount", "true"], check=False).returncode != 0:
        missing("cannot create mount namespaces here (unshare --mount failed; needs root)")
    images = tmp_path / "images"
    images.mkdir()
    img = make_raw(images / "a.raw", 0xAB)
    with pytest.raises(LaunchError) as info:
        stock_qemu("-drive", f"file={img},format=raw,if=none,id=drive0", hide_dirs=(images,))
    assert str(img) in info.value.log
    assert "No such file or directory" in info.value.log
    assert img.exists()  # hidden from QEMU only
