"""Contracts between the block-layer model's core and its format drivers.

The core (``testbed.block`` modules other than ``formats/``) owns nodes,
permissions, probing, reopen and the order of opens; it hands a format
driver a :class:`BlockFile` for ``bs->file`` and an :class:`OpenContext`
through which the driver opens any further files (vmdk extents, a qcow2
external data file), so that every open goes through ``qemu_open`` and
shows up in the trace in QEMU's order.  The backing file is *not* opened by
the driver: like QEMU's ``bdrv_open_backing_file`` the core does it after
the driver's ``open`` returns, using :attr:`FormatImage.backing_filename`.

Format drivers never call ``os.open`` and never hold paths to image files
except to report them.  Corrupt metadata raises
:class:`testbed.errors.CorruptImageError` (format, field, offset), and
nothing reads past the end of a file on the strength of a header field
without checking it first.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Protocol

from testbed.errors import BlockError, BlockUsageError

#: Reads guest data from the backing chain below an image: (offset, length)
#: -> exactly ``length`` bytes.  Zeros when there is no backing file.
BackingReader = Callable[[int, int], bytes]


def zeros_backing(offset: int, length: int) -> bytes:
    """The backing reader of an image without a backing file."""
    return bytes(length)


class ChildRole(StrEnum):
    """QEMU's roles of a protocol child, which decide its write permission
    (``bdrv_default_perms``)."""

    #: Written whenever the parent is writable (qcow2's or vmdk's ``file``,
    #: vmdk sparse extents): the format keeps its metadata there.
    METADATA = "metadata"
    #: Written only when the parent's own users write (raw's ``file``, flat
    #: extents, a qcow2 data file): guest data only.
    DATA = "data"


@dataclass(frozen=True, kw_only=True)
class ChildSpec:
    """A child a format node opens besides ``file`` (a vmdk extent, a qcow2 data file).

    The driver declares its kinds of child in :attr:`FormatDriver.children`
    and names one with every :meth:`OpenContext.open_file`; the core needs
    no format names to open it.  ``role`` decides when the child is opened
    for writing; ``relative_to_parent`` resolves a relative name against the
    parent's file (vmdk's extents), otherwise the name is used as stored
    (QEMU 7.2's qcow2 hands its data file name to ``bdrv_open_child``
    unresolved, so it is relative to QEMU's working directory; strace shows it).
    """

    #: The child's name in QEMU (``"extent"``, ``"data-file"``).
    name: str
    role: ChildRole
    relative_to_parent: bool


class BlockFile(Protocol):
    """A protocol node's bytes (``bs->file``): the file the broker handed over."""

    @property
    def filename(self) -> str:
        """The name QEMU would use for this file (used to resolve relative names)."""
        ...

    def size(self) -> int:
        """Current length of the file in bytes."""
        ...

    def pread(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes; the part past end of file reads as zeros."""
        ...

    def pwrite(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (only on a node opened read-write)."""
        ...


class OpenContext(Protocol):
    """What the core offers a format driver during ``open``."""

    @property
    def read_only(self) -> bool:
        """Whether the format node is being opened read-only."""
        ...

    def open_file(self, filename: str, *, child: ChildSpec, relative_to: BlockFile) -> BlockFile:
        """Open another file as a ``child`` of this node, through ``qemu_open``.

        A relative name is resolved against ``relative_to``'s directory when
        ``child.relative_to_parent`` says so.  Raises ``OSError`` with the
        broker's errno when the open is refused.
        """
        ...


class FormatImage(ABC):
    """An opened image: metadata parsed, ready to serve guest reads."""

    #: Guest-visible size in bytes.
    virtual_size: int
    #: The backing file name as stored in the image (not yet resolved), or None.
    backing_filename: str | None = None
    #: The backing format as stored in the image, or None to probe.
    backing_format: str | None = None

    @abstractmethod
    def read(self, offset: int, length: int, backing: BackingReader) -> bytes:
        """Guest data; unallocated areas come from ``backing``."""

    def write(self, offset: int, data: bytes, backing: BackingReader) -> None:
        """Guest write.  Formats the model does not write to refuse it."""
        raise BlockError(f"the model does not write to {type(self).__name__} images")

    def close(self) -> None:  # noqa: B027 - most formats hold nothing but their BlockFile
        """Drop caches; the core closes the files."""


class FormatDriver(ABC):
    """One image format, as QEMU's ``BlockDriver`` for a format node."""

    #: QEMU's driver name (``"qcow2"``, ``"vmdk"``, ``"vpc"``, ``"vdi"``, ``"raw"``).
    name: ClassVar[str]
    #: The role of the node's ``file`` child: what the core opens it for.
    file_role: ClassVar[ChildRole] = ChildRole.METADATA
    #: The further children the driver may open through ``ctx.open_file``.
    children: ClassVar[tuple[ChildSpec, ...]] = ()
    #: Whether :meth:`create` can format an overlay (external snapshots).
    creates_overlays: ClassVar[bool] = False
    #: Whether the model creates a job's target (drive-mirror, drive-backup) in it.
    creates_targets: ClassVar[bool] = False
    #: Whether an image is just its protocol file's bytes (raw): a new one is
    #: the file made at full size, with nothing to format after it.
    bare: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def probe(cls, buf: bytes, filename: str) -> int:
        """Score 0..100 like QEMU's ``bdrv_probe`` for the first 2048 bytes."""

    @classmethod
    @abstractmethod
    def open(cls, file: BlockFile, ctx: OpenContext) -> FormatImage:
        """Parse the image behind ``file``; open extra files through ``ctx``."""

    @classmethod
    def create(
        cls,
        file: BlockFile,
        *,
        size: int,
        backing_file: str | None,
        backing_format: str | None,
    ) -> None:
        """Format the empty ``file`` as an overlay of ``backing_file`` (``bdrv_img_create``).

        Only drivers with :attr:`creates_overlays` (or :attr:`creates_targets`
        and not :attr:`bare`) implement it; ``backing_file`` None: no backing.
        """
        raise BlockError(f"the model does not create {cls.name} images")


class FdFile:
    """A :class:`BlockFile` over a descriptor (tests and simple callers).

    The core has its own richer node type; this one only wraps ``os.pread``.
    """

    def __init__(self, fd: int, filename: str) -> None:
        self.fd = fd
        self._filename = filename

    @property
    def filename(self) -> str:
        return self._filename

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def pwrite(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)


class MemFile:
    """A :class:`BlockFile` over bytes in memory (tests, fuzzing parsers).

    Reads past the end are zero-filled like :class:`FdFile`; a write past
    the end grows the data.  A negative offset or length is a caller's bug
    and raises, as ``os.pread`` would.
    """

    def __init__(self, data: bytes, filename: str = "mem.img") -> None:
        self.data = bytearray(data)
        self._filename = filename

    @property
    def filename(self) -> str:
        return self._filename

    def size(self) -> int:
        return len(self.data)

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise BlockUsageError(f"pread of {length} bytes at offset {offset}")
        chunk = bytes(self.data[offset : offset + length])
        return chunk + bytes(length - len(chunk))

    def pwrite(self, offset: int, data: bytes) -> None:
        if offset < 0:
            raise BlockUsageError(f"pwrite at offset {offset}")
        if offset > len(self.data):
            self.data += bytes(offset - len(self.data))
        self.data[offset : offset + len(data)] = data


class LocalOpenContext:
    """An :class:`OpenContext` that opens children with plain ``os.open``.

    For format-driver unit tests only; the model's core routes child opens
    through ``qemu_open`` instead.
    """

    def __init__(self, *, read_only: bool = True) -> None:
        self._read_only = read_only
        self.opened: list[tuple[str, str]] = []
        self.fds: list[int] = []

    @property
    def read_only(self) -> bool:
        return self._read_only

    def open_file(self, filename: str, *, child: ChildSpec, relative_to: BlockFile) -> BlockFile:
        if not os.path.isabs(filename) and child.relative_to_parent:
            filename = os.path.join(os.path.dirname(relative_to.filename), filename)
        fd = os.open(filename, (os.O_RDONLY if self._read_only else os.O_RDWR) | os.O_CLOEXEC)
        self.opened.append((child.name, filename))
        self.fds.append(fd)
        return FdFile(fd, filename)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
