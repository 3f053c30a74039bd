"""The VirtualBox VDI format, QEMU's ``vdi`` driver (block/vdi.c), static and dynamic.

Specification: there is no formal one; QEMU's block/vdi.c comments and
struct VdiHeader are the reference, after VirtualBox's
src/VBox/Storage/VDICore.h (https://www.virtualbox.org/browser/vbox/trunk/src/VBox/Storage/VDICore.h).

As QEMU 7.2, only version 1.1 headers with 512-byte sectors and 1 MiB
blocks are accepted; block map entries 0xffffffff (unallocated) and
0xfffffffe (discarded) read as zeros, and there is no backing file (QEMU
refuses images with a parent UUID).  Unlike QEMU, which only notices in
``qemu-img check``, a block map entry pointing past the blocks of the image
is refused at open.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from testbed.block.driver import BackingReader, BlockFile, FormatDriver, FormatImage, OpenContext
from testbed.block.formats import read_checked
from testbed.block.formats.header import HeaderLayout
from testbed.errors import BlockError, CorruptImageError

FMT = "vdi"
SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
SECTOR = 512
BLOCK_SIZE = 1024 * 1024
TYPE_DYNAMIC = 1
TYPE_STATIC = 2
UNALLOCATED = 0xFFFFFFFF
DISCARDED = 0xFFFFFFFE
#: QEMU's VDI_BLOCKS_IN_IMAGE_MAX: the block map stays below INT_MAX bytes.
MAX_BLOCKS = (0x7FFFFFFF + 1 - SECTOR) // 4

# struct VdiHeader, little-endian, 512 bytes (QEMU block/vdi.c).
_HEADER = HeaderLayout(
    FMT,
    "<",
    (
        ("text", "64s"),
        ("signature", "I"),
        ("version", "I"),
        ("header_size", "I"),
        ("image_type", "I"),
        ("image_flags", "I"),
        ("description", "256s"),
        ("offset_bmap", "I"),
        ("offset_data", "I"),
        ("cylinders", "I"),
        ("heads", "I"),
        ("sectors", "I"),
        ("sector_size", "I"),
        ("unused1", "I"),
        ("disk_size", "Q"),
        ("block_size", "I"),
        ("block_extra", "I"),
        ("blocks_in_image", "I"),
        ("blocks_allocated", "I"),
        ("uuid_image", "16s"),
        ("uuid_last_snap", "16s"),
        ("uuid_link", "16s"),
        ("uuid_parent", "16s"),
        ("unused2", "56s"),
    ),
)
HEADER_SIZE = _HEADER.size  # 512
_SIGNATURE_AT = _HEADER.offset("signature")


@dataclass(frozen=True, kw_only=True)
class VdiHeader:
    """The VDI pre-header and header, validated as vdi_open does."""

    version: int
    image_type: int
    offset_bmap: int
    offset_data: int
    disk_size: int
    blocks_in_image: int
    blocks_allocated: int

    @classmethod
    def parse(cls, buf: bytes) -> VdiHeader:
        if len(buf) < HEADER_SIZE:
            raise CorruptImageError(
                fmt=FMT,
                field="header",
                offset=0,
                message=f"file of {len(buf)} bytes is too short for a VDI header",
            )
        h = _HEADER.unpack_dict(buf)
        signature, version, image_type = h["signature"], h["version"], h["image_type"]
        offset_bmap, offset_data = h["offset_bmap"], h["offset_data"]
        sector_size, disk_size, block_size = h["sector_size"], h["disk_size"], h["block_size"]
        blocks_in_image, blocks_allocated = h["blocks_in_image"], h["blocks_allocated"]
        uuid_link, uuid_parent = h["uuid_link"], h["uuid_parent"]
        if disk_size > MAX_BLOCKS * BLOCK_SIZE:
            raise _HEADER.corrupt("disk_size", f"disk_size {disk_size:#x} is above the VDI maximum")
        # 'VBoxManage convertfromraw' makes odd sizes; QEMU rounds them up.
        disk_size = -(-disk_size // SECTOR) * SECTOR
        if signature != SIGNATURE:
            raise _HEADER.corrupt("signature", f"bad signature {signature:#010x}")
        if version != VERSION_1_1:
            raise _HEADER.corrupt(
                "version", f"unsupported version {version >> 16}.{version & 0xFFFF}"
            )
        if offset_bmap % SECTOR:
            raise _HEADER.corrupt(
                "offset_bmap", f"block map offset {offset_bmap:#x} is not sector aligned"
            )
        if offset_data % SECTOR:
            raise _HEADER.corrupt(
                "offset_data", f"data offset {offset_data:#x} is not sector aligned"
            )
        if sector_size != SECTOR:
            raise _HEADER.corrupt("sector_size", f"unsupported sector size {sector_size}")
        if block_size != BLOCK_SIZE:
            raise _HEADER.corrupt("block_size", f"unsupported block size {block_size}")
        if disk_size > blocks_in_image * BLOCK_SIZE:
            raise _HEADER.corrupt(
                "blocks_in_image", f"disk size {disk_size} does not fit in {blocks_in_image} blocks"
            )
        if any(uuid_link):
            raise _HEADER.corrupt("uuid_link", "non-null link UUID is not supported")
        if any(uuid_parent):
            raise _HEADER.corrupt(
                "uuid_parent", "non-null parent UUID (differencing image) is not supported"
            )
        if blocks_in_image > MAX_BLOCKS:
            raise _HEADER.corrupt(
                "blocks_in_image", f"{blocks_in_image} blocks, above {MAX_BLOCKS}"
            )
        return cls(
            version=version,
            image_type=image_type,
            offset_bmap=offset_bmap,
            offset_data=offset_data,
            disk_size=disk_size,
            blocks_in_image=blocks_in_image,
            blocks_allocated=blocks_allocated,
        )


class VdiImage(FormatImage):
    """An opened VDI image."""

    def __init__(self, file: BlockFile, header: VdiHeader, bmap: tuple[int, ...]) -> None:
        self.file = file
        self.header = header
        self.bmap = bmap
        self.virtual_size = header.disk_size

    def read(self, offset: int, length: int, backing: BackingReader) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise BlockError(
                f"vdi: request of {length} bytes at {offset} is outside the "
                f"{self.virtual_size}-byte image {self.file.filename}"
            )
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            index, in_block = divmod(pos, BLOCK_SIZE)
            n = min(BLOCK_SIZE - in_block, end - pos)
            entry = self.bmap[index]
            if entry >= DISCARDED:
                out += bytes(n)
            else:
                out += self.file.pread(self.header.offset_data + entry * BLOCK_SIZE + in_block, n)
            pos += n
        return bytes(out)


class VdiDriver(FormatDriver):
    """QEMU's ``vdi`` format driver."""

    name: ClassVar[str] = "vdi"

    @classmethod
    def probe(cls, buf: bytes, filename: str) -> int:
        # vdi_probe: a whole header's worth of bytes and the signature.
        if (
            len(buf) >= HEADER_SIZE
            and int.from_bytes(buf[_SIGNATURE_AT : _SIGNATURE_AT + 4], "little") == SIGNATURE
        ):
            return 100
        return 0

    @classmethod
    def open(cls, file: BlockFile, ctx: OpenContext) -> VdiImage:
        size = file.size()
        header = VdiHeader.parse(file.pread(0, min(size, HEADER_SIZE)))
        # QEMU reads the map rounded up to whole sectors.
        map_bytes = -(-header.blocks_in_image * 4 // SECTOR) * SECTOR
        raw = read_checked(
            file, header.offset_bmap, map_bytes, fmt=FMT, field="offset_bmap", file_size=size
        )
        bmap = struct.unpack_from(f"<{header.blocks_in_image}I", raw)
        needed_blocks = -(-header.disk_size // BLOCK_SIZE)
        for index, entry in enumerate(bmap[:needed_blocks]):
            if entry < DISCARDED and entry >= header.blocks_in_image:
                raise CorruptImageError(
                    fmt=FMT,
                    field=f"block map entry {index}",
                    offset=header.offset_bmap + 4 * index,
                    message=f"block {entry} is beyond the image's {header.blocks_in_image} blocks",
                )
            if entry < DISCARDED and header.offset_data + (entry + 1) * BLOCK_SIZE > size:
                raise CorruptImageError(
                    fmt=FMT,
                    field=f"block map entry {index}",
                    offset=header.offset_bmap + 4 * index,
                    message=f"block {entry} lies past the end of the file ({size} bytes)",
                )
        return VdiImage(file, header, bmap)
