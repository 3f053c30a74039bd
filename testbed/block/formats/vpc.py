"""The VHD format, QEMU's ``vpc`` driver (block/vpc.c), fixed and dynamic disks.

Specification: Microsoft's "Virtual Hard Disk Image Format Specification"
(version 1.0, 2006), https://www.microsoft.com/en-us/download/details.aspx?id=23850

Behaviour follows QEMU 7.2's vpc_open, including its choices where the spec
is loose: a footer copy at offset 0 means a dynamic disk, otherwise the
footer at the end must say "fixed"; the footer checksum must match; the
guest size comes from CHS geometry or from ``current_size`` depending on the
creator application.  As in QEMU, reads of an allocated block ignore the
block's sector bitmap, and unallocated blocks read as zeros (QEMU's vpc
driver does not handle differencing disks, so there is no backing file).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from testbed.block.driver import BackingReader, BlockFile, FormatDriver, FormatImage, OpenContext
from testbed.block.formats import read_checked
from testbed.block.formats.header import HeaderLayout
from testbed.errors import BlockError, CorruptImageError

FMT = "vpc"
FOOTER_MAGIC = b"conectix"
DYNAMIC_MAGIC = b"cxsparse"
SECTOR = 512

# Hard disk footer, big-endian (spec "Hard Disk Footer Format"), 512 bytes: these
# fields, then 427 reserved bytes.
_FOOTER = HeaderLayout(
    FMT,
    ">",
    (
        ("cookie", "8s"),
        ("features", "I"),
        ("file_format_version", "I"),
        ("data_offset", "Q"),
        ("timestamp", "I"),
        ("creator_app", "4s"),
        ("creator_version", "I"),
        ("creator_host_os", "4s"),
        ("original_size", "Q"),
        ("current_size", "Q"),
        ("cylinders", "H"),
        ("heads", "B"),
        ("sectors_per_track", "B"),
        ("disk_type", "I"),
        ("checksum", "I"),
        ("uuid", "16s"),
        ("saved_state", "B"),
    ),
)
FOOTER_SIZE = 512
CHECKSUM_OFFSET = _FOOTER.offset("checksum")

# Dynamic disk header, big-endian (spec "Dynamic Disk Header Format"), 1024 bytes:
# these fields, then parent_uuid[16] (40), parent_timestamp, reserved,
# parent_unicode_name[512] (64), parent_locators[8 * 24] (576), reserved[256] (768).
_DYNAMIC = HeaderLayout(
    FMT,
    ">",
    (
        ("cookie", "8s"),
        ("data_offset", "Q"),
        ("table_offset", "Q"),
        ("header_version", "I"),
        ("max_table_entries", "I"),
        ("block_size", "I"),
        ("checksum", "I"),
    ),
)
DYNAMIC_SIZE = 1024

DISK_FIXED = 2
DISK_DYNAMIC = 3
DISK_DIFFERENCING = 4
BAT_UNUSED = 0xFFFFFFFF

CHS_MAX_GEOMETRY = 65535 * 16 * 255
MAX_SECTORS = 0xFF000000  # QEMU allows at most 2040 GiB
#: QEMU reads the BAT in one go and refuses more than INT_MAX / 4 entries.
MAX_TABLE_ENTRIES = 0x7FFFFFFF // 4
#: Creator applications whose images QEMU sizes by current_size, not CHS.
CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")


def vpc_checksum(data: bytes) -> int:
    """The spec's checksum: one's complement of the byte sum."""
    return ~sum(data) & 0xFFFFFFFF


@dataclass(frozen=True, kw_only=True)
class VhdFooter:
    """The hard disk footer (also copied at offset 0 of dynamic disks)."""

    features: int
    version: int
    data_offset: int
    creator_app: bytes
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: int
    checksum: int

    @classmethod
    def parse(cls, buf: bytes, offset: int) -> VhdFooter:
        """Parse and check the 512-byte footer ``buf`` found at file ``offset``."""
        if len(buf) < FOOTER_SIZE:
            raise CorruptImageError(
                fmt=FMT,
                field="footer",
                offset=offset,
                message=f"only {len(buf)} bytes where a 512-byte footer should be",
            )
        (
            cookie,
            features,
            version,
            data_offset,
            _timestamp,
            creator_app,
            _creator_version,
            _host_os,
            _original_size,
            current_size,
            cylinders,
            heads,
            sectors_per_track,
            disk_type,
            checksum,
            _uuid,
            _saved_state,
        ) = _FOOTER.unpack(buf)
        if cookie != FOOTER_MAGIC:
            raise _FOOTER.corrupt("cookie", f"bad footer cookie {cookie!r}", at=offset)
        zeroed = buf[:CHECKSUM_OFFSET] + bytes(4) + buf[CHECKSUM_OFFSET + 4 : FOOTER_SIZE]
        expected = vpc_checksum(zeroed)
        if checksum != expected:
            raise _FOOTER.corrupt(
                "checksum",
                f"footer checksum {checksum:#010x} does not match the computed {expected:#010x}",
                at=offset,
            )
        return cls(
            features=features,
            version=version,
            data_offset=data_offset,
            creator_app=creator_app,
            current_size=current_size,
            cylinders=cylinders,
            heads=heads,
            sectors_per_track=sectors_per_track,
            disk_type=disk_type,
            checksum=checksum,
        )

    def total_sectors(self) -> int:
        """The guest size in sectors, decided as vpc_open does."""
        chs = self.cylinders * self.heads * self.sectors_per_track
        use_chs = self.creator_app not in CURRENT_SIZE_CREATORS
        if not use_chs or chs == CHS_MAX_GEOMETRY:
            return self.current_size // SECTOR
        return chs


@dataclass(frozen=True, kw_only=True)
class VhdDynamicHeader:
    """The dynamic disk header: where the BAT is and how big blocks are."""

    table_offset: int
    max_table_entries: int
    block_size: int

    @classmethod
    def parse(cls, buf: bytes, offset: int) -> VhdDynamicHeader:
        if len(buf) < _DYNAMIC.size:
            raise CorruptImageError(
                fmt=FMT,
                field="dynamic header",
                offset=offset,
                message="dynamic header is truncated",
            )
        cookie, _data_offset, table_offset, _version, entries, block_size, _checksum = (
            _DYNAMIC.unpack(buf)
        )
        if cookie != DYNAMIC_MAGIC:
            raise _DYNAMIC.corrupt(
                "cookie",
                f"bad dynamic header cookie {cookie!r}",
                field="dynamic header cookie",
                at=offset,
            )
        if block_size < SECTOR or block_size & (block_size - 1):
            raise _DYNAMIC.corrupt(
                "block_size",
                f"block size {block_size} is not a power of two of at least 512",
                at=offset,
            )
        if entries > MAX_TABLE_ENTRIES:
            raise _DYNAMIC.corrupt(
                "max_table_entries",
                f"max_table_entries {entries} is above {MAX_TABLE_ENTRIES}",
                at=offset,
            )
        return cls(table_offset=table_offset, max_table_entries=entries, block_size=block_size)

    @property
    def bitmap_size(self) -> int:
        """Bytes of sector bitmap before each block's data, rounded to sectors."""
        return (self.block_size // (8 * SECTOR) + 511) & ~511


class VpcImage(FormatImage):
    """An opened VHD image (fixed or dynamic)."""

    def __init__(
        self,
        file: BlockFile,
        footer: VhdFooter,
        dynamic: VhdDynamicHeader | None,
        bat: tuple[int, ...],
        total_sectors: int,
    ) -> None:
        self.file = file
        self.footer = footer
        self.dynamic = dynamic
        self.bat = bat
        self.virtual_size = total_sectors * SECTOR

    def read(self, offset: int, length: int, backing: BackingReader) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise BlockError(
                f"vpc: request of {length} bytes at {offset} is outside the "
                f"{self.virtual_size}-byte image {self.file.filename}"
            )
        # QEMU decides by the footer's type, not by where it found the footer.
        if self.dynamic is None or self.footer.disk_type == DISK_FIXED:
            return self.file.pread(offset, length)
        block_size = self.dynamic.block_size
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            index, in_block = divmod(pos, block_size)
            n = min(block_size - in_block, end - pos)
            entry = self.bat[index] if index < len(self.bat) else BAT_UNUSED
            if entry == BAT_UNUSED:
                out += bytes(n)
            else:
                out += self.file.pread(SECTOR * entry + self.dynamic.bitmap_size + in_block, n)
            pos += n
        return bytes(out)


class VpcDriver(FormatDriver):
    """QEMU's ``vpc`` format driver (VHD)."""

    name: ClassVar[str] = "vpc"

    @classmethod
    def probe(cls, buf: bytes, filename: str) -> int:
        return 100 if buf[:8] == FOOTER_MAGIC else 0

    @classmethod
    def open(cls, file: BlockFile, ctx: OpenContext) -> VpcImage:
        """``vpc_open``: footer, size rules, dynamic header, BAT.

        Long because the checks come in QEMU's order, kept in one piece to
        read beside the C.
        """
        size = file.size()
        head = file.pread(0, min(size, FOOTER_SIZE))
        if head[:8] == FOOTER_MAGIC:
            footer = VhdFooter.parse(head, 0)
            located_dynamic = True
        else:
            if size < FOOTER_SIZE:
                raise CorruptImageError(
                    fmt=FMT,
                    field="footer",
                    offset=0,
                    message=f"file of {size} bytes is too small for a VHD footer",
                )
            tail = file.pread(size - FOOTER_SIZE, FOOTER_SIZE)
            footer_type = _FOOTER.unpack_dict(tail)["disk_type"]
            if tail[:8] != FOOTER_MAGIC or footer_type != DISK_FIXED:
                raise CorruptImageError(
                    fmt=FMT,
                    field="footer",
                    offset=size - FOOTER_SIZE,
                    message="no 'conectix' footer at the start (dynamic) or a fixed-disk one at "
                    "the end",
                )
            footer = VhdFooter.parse(tail, size - FOOTER_SIZE)
            located_dynamic = False
        total_sectors = footer.total_sectors()
        if total_sectors > MAX_SECTORS:
            raise _FOOTER.corrupt(
                "current_size", f"disk of {total_sectors} sectors is above 2040 GiB"
            )
        if not located_dynamic:
            return VpcImage(file, footer, None, (), total_sectors)

        field_offset = footer.data_offset
        raw = read_checked(
            file, field_offset, DYNAMIC_SIZE, fmt=FMT, field="data_offset", file_size=size
        )
        dynamic = VhdDynamicHeader.parse(raw, field_offset)
        if total_sectors * SECTOR // dynamic.block_size > 0xFFFFFFFF:
            raise _DYNAMIC.corrupt("block_size", "too many blocks", at=field_offset)
        if dynamic.max_table_entries * dynamic.block_size < total_sectors * SECTOR:
            raise _DYNAMIC.corrupt(
                "max_table_entries",
                f"{dynamic.max_table_entries} BAT entries of {dynamic.block_size} bytes "
                f"do not cover a disk of {total_sectors * SECTOR} bytes",
                at=field_offset,
            )
        bat_bytes = read_checked(
            file,
            dynamic.table_offset,
            4 * dynamic.max_table_entries,
            fmt=FMT,
            field="table_offset",
            file_size=size,
        )
        bat = struct.unpack(f">{dynamic.max_table_entries}I", bat_bytes)
        # vpc_open's truncation check: every block (bitmap + data) must be
        # inside the file.
        block_span = dynamic.bitmap_size + dynamic.block_size
        for index, entry in enumerate(bat):
            if entry != BAT_UNUSED and SECTOR * entry + block_span > size:
                raise CorruptImageError(
                    fmt=FMT,
                    field=f"BAT[{index}]",
                    offset=dynamic.table_offset + 4 * index,
                    message=f"block at sector {entry} ends past the end of the file "
                    f"({size} bytes); the image has been truncated",
                )
        return VpcImage(file, footer, dynamic, bat, total_sectors)
