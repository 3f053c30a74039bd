"""The raw format: guest bytes are the file's bytes (QEMU's block/raw-format.c)."""

from __future__ import annotations

from typing import ClassVar

from testbed.block.driver import (
    BackingReader,
    BlockFile,
    ChildRole,
    FormatDriver,
    FormatImage,
    OpenContext,
)
from testbed.errors import BlockError


class RawImage(FormatImage):
    """A raw image: reads and writes go straight to the file."""

    def __init__(self, file: BlockFile) -> None:
        self.file = file
        # file-posix counts whole sectors, so a file of 1000 bytes is a
        # 1024-byte disk whose tail reads as zeros (qemu-img info agrees).
        self.virtual_size = -(-file.size() // 512) * 512

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise BlockError(
                f"raw: request of {length} bytes at {offset} is outside the "
                f"{self.virtual_size}-byte image {self.file.filename}"
            )

    def read(self, offset: int, length: int, backing: BackingReader) -> bytes:
        self._check_range(offset, length)
        return self.file.pread(offset, length)

    def write(self, offset: int, data: bytes, backing: BackingReader) -> None:
        self._check_range(offset, len(data))
        self.file.pwrite(offset, data)


class RawDriver(FormatDriver):
    """QEMU's ``raw`` format driver."""

    name: ClassVar[str] = "raw"
    #: raw_open attaches its file as a data child (BDRV_CHILD_DATA): no metadata.
    file_role: ClassVar[ChildRole] = ChildRole.DATA
    creates_targets: ClassVar[bool] = True
    #: raw_co_create: the file truncated to the disk's size is the whole image.
    bare: ClassVar[bool] = True

    @classmethod
    def probe(cls, buf: bytes, filename: str) -> int:
        # Like raw_probe: the smallest positive score, so raw wins only when
        # no other format recognises the file.
        return 1

    @classmethod
    def open(cls, file: BlockFile, ctx: OpenContext) -> FormatImage:
        return RawImage(file)
