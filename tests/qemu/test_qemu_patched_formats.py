"""Patched QEMU opens every kind of image through the hook, as DESIGN.md section 3 predicts."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from qemu_images import FAT_PATTERN, PATTERN, Images, Open

from testbed.broker import AuditRecord, Broker, Policy
from testbed.errors import LaunchError
from testbed.qemu import Machine
from testbed.qemu.fixtures import MachineFactory

pytestmark = pytest.mark.qemu

Opens = Callable[[Iterable[AuditRecord], Path], list[Open]]

PROBE = "O_RDONLY|O_NONBLOCK"  # file-posix's host_cdrom probe
RO = "O_RDONLY"
RW = "O_RDWR"


def format_opens(name: str) -> list[Open]:
    """A format driver over file-posix with -drive: probe, read-only, write, read-only at quit."""
    return [(name, PROBE), (name, RO), (name, RW), (name, RO)]


CASES = {
    # attribute of Images, format, expected opens (relative to the image dir)
    "raw": ("raw", [("base.raw", PROBE), ("base.raw", RO)]),
    "qcow2": (
        "qcow2",
        [
            ("top.qcow2", PROBE),
            ("top.qcow2", RO),
            ("top.qcow2", RW),
            ("base.raw", PROBE),
            ("base.raw", RO),  # the backing file, read-only
            ("top.qcow2", RO),
        ],
    ),
    "vmdk_sparse": ("vmdk", format_opens("sparse.vmdk")),
    "vmdk_flat": (
        "vmdk",
        [
            ("flat.vmdk", PROBE),
            ("flat.vmdk", RO),
            ("flat.vmdk", RW),
            ("flat-flat.vmdk", PROBE),
            ("flat-flat.vmdk", RO),  # the extent, own file child
            ("flat.vmdk", RO),
        ],
    ),
    "vpc": ("vpc", format_opens("disk.vpc")),
    "vdi": ("vdi", format_opens("disk.vdi")),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_image_opens_go_through_the_hook(
    kind: str, patched_qemu: MachineFactory, broker: Broker, images: Images, opens: Opens
) -> None:
    fmt, expected = CASES[kind]
    img = getattr(images, kind)
    vm = patched_qemu("-drive", f"file={img},format={fmt},if=none,id=drive0")
    out = vm.qemu_io("drive0", f"read -P {PATTERN:#x} 0 4096")
    assert "read 4096/4096 bytes" in out
    assert "Pattern verification failed" not in out
    assert vm.read_bytes("drive0", 4096, 16) == bytes(16)
    assert vm.shutdown() == "quit"
    assert opens(broker.records, images.dir) == expected
    assert all(r.result == 0 for r in broker.records if r.path.startswith(str(images.dir)))


def fat_file_offset(vm: Machine, device: str, name: bytes) -> int:
    """Guest offset of the first cluster of root-directory file ``name`` (8.3, padded)."""
    mbr = vm.read_bytes(device, 0, 512)
    assert mbr[510:512] == b"\x55\xaa"
    part = int.from_bytes(mbr[454:458], "little") * 512
    boot = vm.read_bytes(device, part, 512)
    sector = int.from_bytes(boot[11:13], "little")
    per_cluster = boot[13]
    reserved = int.from_bytes(boot[14:16], "little")
    fats = boot[16]
    root_entries = int.from_bytes(boot[17:19], "little")
    per_fat = int.from_bytes(boot[22:24], "little")
    root = part + (reserved + fats * per_fat) * sector
    data = root + root_entries * 32
    entries = vm.read_bytes(device, root, sector)
    for i in range(0, sector, 32):
        if entries[i : i + 11] == name:
            cluster = int.from_bytes(entries[i + 26 : i + 28], "little")
            return data + (cluster - 2) * per_cluster * sector
    raise AssertionError(f"{name!r} not in the root directory: {entries!r}")


def test_vvfat_reads_host_files_through_the_hook(
    patched_qemu: MachineFactory, images: Images, opens: Opens, tmp_path: Path
) -> None:
    # With the extension patch 0008 vvfat scans its directory through the
    # hook too, and the broker hands out directory fds only under a rule
    # that allows them.
    policy = Policy.from_grants(create=[tmp_path], directories=True)
    with Broker(policy, audit_path=tmp_path / "vvfat-audit.jsonl") as broker:
        vm = patched_qemu(
            "-drive", f"file=fat:{images.fat_dir},format=raw,if=none,id=drive0", broker=broker
        )
        scan = ("fat", "O_RDONLY|O_NONBLOCK|O_DIRECTORY")
        assert opens(broker.records, images.dir) == [scan]
        offset = fat_file_offset(vm, "drive0", b"HELLO   TXT")
        out = vm.qemu_io("drive0", f"read -P {FAT_PATTERN:#x} {offset} 2048")
        assert "Pattern verification failed" not in out
        assert "read 2048/2048 bytes" in out
        vm.shutdown()
        assert set(opens(broker.records, images.dir)) == {scan, ("fat/hello.txt", RO)}


def test_vvfat_directory_is_refused_without_a_directories_rule(
    patched_qemu: MachineFactory, broker: Broker, images: Images
) -> None:
    vm = patched_qemu(
        "-drive", f"file=fat:{images.fat_dir},format=raw,if=none,id=drive0", launch=False
    )
    with pytest.raises(LaunchError, match="Could not read directory"):
        vm.launch()
    assert any(r.result < 0 and r.path.endswith("/fat") for r in broker.records)
