"""Block nodes of the model: file-posix protocol nodes, vvfat nodes, format nodes.

A :class:`FileNode` is QEMU's file-posix ``BDRVRawState``: one descriptor
from ``qemu_open``, its open flags (access mode and ``O_DIRECT``; QEMU's
``raw_parse_flags``), and ``auto-read-only``.  :meth:`FileNode.reopen` is
``raw_reconfigure_getfd``: when only ``O_APPEND``/``O_NONBLOCK``/``O_NOATIME``
differ the old descriptor is dup'd and fcntl'd (no open, the broker sees
nothing), otherwise the file is opened afresh through ``qemu_open`` and
the old descriptor closed.

A :class:`FormatNode` is a format driver's node (qcow2, raw, vmdk, ...)
over its ``file`` child, with further children (vmdk extents, a qcow2 data
file) and an optional ``backing`` node.  Which file nodes want write
permission follows QEMU's child roles (``bdrv_default_perms``): a
``metadata`` child (qcow2's or vmdk's ``file``, sparse extents) is written
whenever its parent is not read-only; a ``data`` child (raw's ``file``,
flat extents) only when the parent's own users write (a device); a
backing child never.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from testbed.block.driver import BackingReader, ChildRole, FormatImage, zeros_backing
from testbed.errors import BlockError

if TYPE_CHECKING:
    from testbed.block.opener import Opener
    from testbed.block.vvfat import VVFat

#: Status flags file-posix changes with fcntl instead of a new open.
FCNTL_FLAGS = os.O_APPEND | os.O_NONBLOCK | os.O_NOATIME


def open_flags(*, read_only: bool, cache_direct: bool) -> int:
    """``raw_parse_flags``: the flags file-posix passes to ``qemu_open``."""
    flags = os.O_RDONLY if read_only else os.O_RDWR
    if cache_direct:
        flags |= os.O_DIRECT
    return flags


class FileNode:
    """A file-posix node: the descriptor the broker handed over (a :class:`BlockFile`)."""

    driver = "file"

    def __init__(
        self,
        opener: Opener,
        filename: str,
        *,
        read_only: bool,
        auto_read_only: bool,
        cache_direct: bool,
    ) -> None:
        self.opener = opener
        self._filename = filename
        self.read_only = read_only
        self.auto_read_only = auto_read_only
        self.cache_direct = cache_direct
        # auto-read-only opens read-only; write comes with the first writer.
        self.flags = open_flags(read_only=read_only or auto_read_only, cache_direct=cache_direct)
        self.fd = opener.qemu_open(filename, self.flags)

    @property
    def filename(self) -> str:
        return self._filename

    @property
    def writable_fd(self) -> bool:
        return self.flags & os.O_ACCMODE == os.O_RDWR

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def pread(self, offset: int, length: int) -> bytes:
        if self.flags & os.O_DIRECT:
            return _direct_pread(self.fd, offset, length)
        data = os.pread(self.fd, length, offset)
        while len(data) < length:
            more = os.pread(self.fd, length - len(data), offset + len(data))
            if not more:
                return data + bytes(length - len(data))
            data += more
        return data

    def pwrite(self, offset: int, data: bytes) -> None:
        if not self.writable_fd:
            raise BlockError(f"{self._filename} is open read-only; the model cannot write to it")
        if self.flags & os.O_DIRECT:
            _direct_pwrite(self.fd, offset, data)
            return
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def reopen(self, flags: int) -> None:
        """``raw_reconfigure_getfd`` + commit: move to ``flags``."""
        if self.fd < 0:
            raise BlockError(f"{self._filename}: reopen of a closed node")
        if self.flags & ~FCNTL_FLAGS == flags & ~FCNTL_FLAGS:
            new_fd = os.dup(self.fd)
            fcntl.fcntl(new_fd, fcntl.F_SETFL, flags & FCNTL_FLAGS)
            os.set_inheritable(new_fd, False)
        else:
            new_fd = self.opener.qemu_open(self._filename, flags)
        os.close(self.fd)
        self.fd, self.flags = new_fd, flags

    def set_write(self, want: bool) -> None:
        """``raw_check_perm``/``raw_set_perm`` under auto-read-only: follow the writers."""
        if self.read_only or self.fd < 0:
            return
        if want and not self.writable_fd:
            self.reopen(open_flags(read_only=False, cache_direct=self.cache_direct))
        elif not want and self.writable_fd and self.auto_read_only:
            self.reopen(open_flags(read_only=True, cache_direct=self.cache_direct))

    def make_read_only(self) -> None:
        """``bdrv_reopen_set_read_only(bs, true)`` reaching this node."""
        self.read_only = True
        if self.fd >= 0 and self.writable_fd:
            self.reopen(open_flags(read_only=True, cache_direct=self.cache_direct))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VVFatNode:
    """The ``fat:`` protocol node (QEMU's vvfat), a :class:`BlockFile` over :class:`VVFat`."""

    driver = "vvfat"
    auto_read_only = False
    read_only = True

    def __init__(self, filename: str, vvfat: VVFat) -> None:
        self._filename = filename
        self.vvfat = vvfat

    @property
    def filename(self) -> str:
        return self._filename

    def size(self) -> int:
        return self.vvfat.virtual_size

    def pread(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.vvfat.virtual_size)
        data = self.vvfat.read(offset, max(0, end - offset)) if end > offset else b""
        return data + bytes(length - len(data))

    def pwrite(self, offset: int, data: bytes) -> None:
        self.vvfat.write(offset, data)

    def set_write(self, want: bool) -> None:
        """vvfat has no descriptor to reopen."""

    def make_read_only(self) -> None:
        """vvfat has no descriptor to reopen."""

    def close(self) -> None:
        self.vvfat.close()


ProtocolNode = FileNode | VVFatNode


@dataclass(eq=False)
class Child:
    """An edge from a format node to a protocol node, with QEMU's role."""

    node: ProtocolNode
    role: ChildRole
    name: str
    #: False for a node reference (``"file": "node-name"``): the child belongs
    #: to another named node and is not closed with this one.
    owned: bool = True


@dataclass(eq=False)
class FormatNode:
    """A format driver's node (``BlockDriverState`` with a format driver)."""

    driver: str
    node_name: str
    filename: str
    image: FormatImage
    file: Child
    read_only: bool
    auto_read_only: bool
    cache_direct: bool
    #: Children other than ``file`` (extents, data-file), in open order.
    others: list[Child] = field(default_factory=list)
    backing: FormatNode | None = None
    #: Users of this node that take write permission (devices, overlays' writes).
    writers: int = 0
    closed: bool = False

    @property
    def virtual_size(self) -> int:
        return self.image.virtual_size

    def children(self) -> list[Child]:
        """Protocol children in the order QEMU reopens and closes them."""
        return [*self.others, self.file]

    def wants_write(self, child: Child) -> bool:
        if child.role == ChildRole.METADATA:
            return not self.read_only
        return not self.read_only and self.writers > 0

    def refresh_perms(self) -> None:
        """``bdrv_refresh_perms``: children follow what this node's users need."""
        for child in self.children():
            child.node.set_write(self.wants_write(child))

    def backing_reader(self) -> BackingReader:
        backing = self.backing
        if backing is None:
            return zeros_backing
        return backing.read_clamped

    def read(self, offset: int, length: int) -> bytes:
        return self.image.read(offset, length, self.backing_reader())

    def read_clamped(self, offset: int, length: int) -> bytes:
        """A read as the overlay above sees it: past our end reads as zeros."""
        size = self.virtual_size
        if offset >= size:
            return bytes(length)
        head = min(length, size - offset)
        data = self.image.read(offset, head, self.backing_reader())
        return data + bytes(length - head)

    def write(self, offset: int, data: bytes) -> None:
        if self.read_only:
            raise BlockError(f"node {self.node_name!r} ({self.filename}) is read-only")
        self.image.write(offset, data, self.backing_reader())

    def chain(self) -> list[FormatNode]:
        nodes: list[FormatNode] = []
        node: FormatNode | None = self
        while node is not None:
            nodes.append(node)
            node = node.backing
        return nodes


#: O_DIRECT wants buffers, offsets and lengths aligned; a page satisfies
#: every file system the testbed runs on.
_ALIGN = mmap.PAGESIZE


def _direct_pread(fd: int, offset: int, length: int) -> bytes:
    start = offset - offset % _ALIGN
    end = -(-(offset + length) // _ALIGN) * _ALIGN
    with mmap.mmap(-1, max(end - start, _ALIGN)) as buf:
        got = os.preadv(fd, [buf], start)
        data = bytes(buf[offset - start : min(got, offset - start + length)])
    return data + bytes(length - len(data))


def _direct_pwrite(fd: int, offset: int, data: bytes) -> None:
    start = offset - offset % _ALIGN
    end = -(-(offset + len(data)) // _ALIGN) * _ALIGN
    size = os.fstat(fd).st_size
    with mmap.mmap(-1, end - start) as buf:
        os.preadv(fd, [buf], start)
        buf[offset - start : offset - start + len(data)] = data
        os.pwritev(fd, [buf], start)
    if offset + len(data) > size:
        # The aligned write may have grown the file past what was asked.
        os.ftruncate(fd, max(size, offset + len(data)))
