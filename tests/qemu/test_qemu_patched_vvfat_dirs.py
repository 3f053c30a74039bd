"""vvfat's directory scan goes through the hook (patch 0008).

With the patch, each directory of a ``fat:`` tree is opened with
``qemu_open(O_RDONLY|O_NONBLOCK|O_DIRECTORY)`` (glibc's opendir() flags) and
its entries are looked up relative to that descriptor, so a QEMU that
cannot see the tree at all (a mount namespace hides it) still builds the
FAT disk from what the broker opened.  The broker must grant the
directories: these tests grant the tree read-only (``--allow-ro TREE``),
which the broker in this tree lets cover directories; once directory
descriptors need the hardening's ``directories = true`` rule, the grants
here need it too.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu_images import Open, select_opens

from testbed.broker import Broker, Policy
from testbed.errors import LaunchError
from testbed.pytest_plugin import missing
from testbed.qemu import Machine
from testbed.qemu.fixtures import MachineFactory

pytestmark = pytest.mark.qemu

DIR_FLAGS = "O_RDONLY|O_NONBLOCK|O_DIRECTORY"  # glibc's opendir(), CLOEXEC aside
RO = "O_RDONLY"
HELLO, INNER = 0x5A, 0x3C


@dataclass(frozen=True)
class Tree:
    root: Path  # the fat: directory
    hello: Path  # root/hello.txt
    sub: Path  # root/sub
    inner: Path  # root/sub/inner.txt


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    root = tmp_path / "fat"
    sub = root / "sub"
    sub.mkdir(parents=True)
    hello, inner = root / "hello.txt", sub / "inner.txt"
    hello.write_bytes(bytes([HELLO]) * 2048)
    inner.write_bytes(bytes([INNER]) * 1024)
    return Tree(root=root, hello=hello, sub=sub, inner=inner)


def drive(tree: Tree) -> tuple[str, str]:
    return ("-drive", f"file=fat:{tree.root},format=raw,if=none,id=drive0")


@dataclass(frozen=True)
class Fat:
    """Where things are on a vvfat disk (FAT16 behind an MBR, as vvfat builds it)."""

    sector: int
    cluster: int  # bytes
    root: int  # offset of the root directory
    data: int  # offset of cluster 2

    def cluster_offset(self, n: int) -> int:
        return self.data + (n - 2) * self.cluster


def read_layout(vm: Machine) -> Fat:
    mbr = vm.read_bytes("drive0", 0, 512)
    assert mbr[510:512] == b"\x55\xaa"
    part = int.from_bytes(mbr[454:458], "little") * 512
    boot = vm.read_bytes("drive0", part, 512)
    sector = int.from_bytes(boot[11:13], "little")
    reserved = int.from_bytes(boot[14:16], "little")
    root = part + (reserved + boot[16] * int.from_bytes(boot[22:24], "little")) * sector
    data = root + int.from_bytes(boot[17:19], "little") * 32
    return Fat(sector=sector, cluster=boot[13] * sector, root=root, data=data)


def find_entry(vm: Machine, offset: int, length: int, name: bytes) -> int:
    """First cluster of the 8.3 entry ``name`` in the directory at ``offset``."""
    entries = vm.read_bytes("drive0", offset, length)
    for i in range(0, length, 32):
        if entries[i : i + 11] == name:
            return int.from_bytes(entries[i + 26 : i + 28], "little")
    raise AssertionError(f"{name!r} is not in the directory at {offset:#x}: {entries!r}")


def check_guest_view(vm: Machine) -> None:
    """Both files, the second in a subdirectory, read back with their contents."""
    fat = read_layout(vm)
    hello = fat.cluster_offset(find_entry(vm, fat.root, fat.sector, b"HELLO   TXT"))
    sub = fat.cluster_offset(find_entry(vm, fat.root, fat.sector, b"SUB        "))
    inner = fat.cluster_offset(find_entry(vm, sub, fat.sector, b"INNER   TXT"))
    for offset, pattern, size in ((hello, HELLO, 2048), (inner, INNER, 1024)):
        out = vm.qemu_io("drive0", f"read -P {pattern:#x} {offset} {size}")
        assert f"read {size}/{size} bytes" in out
        assert "Pattern verification failed" not in out


def expected_opens(tree: Tree) -> list[Open]:
    base = tree.root.parent
    rel = lambda p: str(p.relative_to(base))  # noqa: E731
    return [
        (rel(tree.root), DIR_FLAGS),
        (rel(tree.sub), DIR_FLAGS),
        (rel(tree.hello), RO),
        (rel(tree.inner), RO),
    ]


@pytest.fixture
def _need_namespaces() -> None:
    if subprocess.run(["unshare", "--mount", "true"], check=False).returncode != 0:
        missing("cannot create mount namespaces here (unshare --mount failed; needs root)")


@pytest.mark.usefixtures("_need_namespaces")
def test_hidden_tree_is_scanned_through_the_hook(patched_qemu: MachineFactory, tree: Tree) -> None:
    broker = Broker(Policy.from_grants(ro=[tree.root], directories=True)).start()
    try:
        vm = patched_qemu(*drive(tree), broker=broker, hide_dirs=(tree.root,))
        check_guest_view(vm)
        assert vm.shutdown() == "quit"
    finally:
        broker.stop()
    assert select_opens(broker.records, tree.root.parent) == expected_opens(tree)
    # Refused, outside the tree: file-posix's probe of the whole "fat:..." name.
    refused = [r for r in broker.records if r.result != 0]
    assert all(not r.path.startswith(str(tree.root)) for r in refused), refused


def test_tree_without_a_directory_grant_is_refused(
    patched_qemu: MachineFactory, tree: Tree
) -> None:
    # Every file granted, no directory: the scan's first open is refused.
    broker = Broker(Policy.from_grants(ro=[tree.hello, tree.inner])).start()
    try:
        with pytest.raises(LaunchError) as info:
            patched_qemu(*drive(tree), broker=broker)
    finally:
        broker.stop()
    assert f"Could not read directory {tree.root}" in info.value.log
    assert "Permission denied" in info.value.log
    assert select_opens(broker.records, tree.root.parent) == [("fat", DIR_FLAGS)]


def traced(factory: MachineFactory, tree: Tree, trace: Path, **kwargs: Any) -> None:
    vm = factory(
        *drive(tree),
        wrapper=("strace", "-f", "-qq", "-o", str(trace), "-e", "trace=openat"),
        **kwargs,
    )
    check_guest_view(vm)
    assert vm.shutdown() == "quit"


def test_directory_opens_are_those_of_stock(
    patched_qemu: MachineFactory,
    stock_qemu: MachineFactory,
    tree: Tree,
    tmp_path: Path,
    strace: Callable[[Path, Path], list[Open]],
) -> None:
    """The hook sees what strace shows for stock QEMU; unhooked, the patch opens the same."""
    base = tree.root.parent
    traced(stock_qemu, tree, tmp_path / "stock.trace")
    stock = strace(tmp_path / "stock.trace", base)
    assert stock == expected_opens(tree)
    traced(patched_qemu, tree, tmp_path / "patched.trace", hook=False)
    assert strace(tmp_path / "patched.trace", base) == stock
    broker = Broker(Policy.from_grants(ro=[tree.root], directories=True)).start()
    try:
        vm = patched_qemu(*drive(tree), broker=broker)
        check_guest_view(vm)
        assert vm.shutdown() == "quit"
    finally:
        broker.stop()
    assert select_opens(broker.records, base) == stock
