"""On-disk structures of VMDK sparse extents, parsed from bytes.

References:

- VMware, "Virtual Disk Format 5.0" (the sparse extent header, grain
  directory and tables, stream-optimized markers and footer):
  https://www.vmware.com/app/vmdk/?src=vmdk
- QEMU 7.2 ``block/vmdk.c`` (``VMDK4Header``, ``VMDK3Header``,
  ``VmdkGrainMarker``, ``vmdk_open_vmdk4``, ``vmdk_open_vmfs_sparse``), whose
  behaviour the model follows where the two disagree.

All integers are little-endian except the magic, which QEMU reads big-endian
(``KDMV`` and ``COWD`` as they appear in the file).  Nothing here reads a
file: the functions take bytes and return frozen dataclasses, so each
structure can be tested and fuzzed on its own.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from testbed.block.formats.header import HeaderLayout
from testbed.errors import CorruptImageError

FORMAT = "vmdk"
SECTOR = 512

MAGIC_VMDK4 = b"KDMV"  # hosted sparse extent ("VMDK4" in QEMU)
MAGIC_VMDK3 = b"COWD"  # ESX VMFSSPARSE extent ("VMDK3" in QEMU)

FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1  # a redundant grain directory exists
FLAG_ZERO_GRAIN = 1 << 2  # grain table entry 1 means "reads as zeros"
FLAG_COMPRESS = 1 << 16
FLAG_MARKER = 1 << 17

COMPRESSION_DEFLATE = 1
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF
GTE_ZEROED = 1

MARKER_END_OF_STREAM = 0
MARKER_GRAIN_TABLE = 1
MARKER_GRAIN_DIRECTORY = 2
MARKER_FOOTER = 3

#: QEMU refuses more than 512 grain table entries per table (vmdk_open_vmdk4).
MAX_GTES_PER_GT = 512
#: QEMU refuses grains over 0x200000 sectors, "1GB for one cluster is unrealistic".
MAX_GRAIN_SECTORS = 0x200000
#: QEMU refuses grain directories over 32 Mi entries (vmdk_add_extent).
MAX_GD_ENTRIES = 32 * 1024 * 1024


# The magic and VMDK4Header (QEMU_PACKED); sizes and offsets in sectors where
# the field is a position: desc_* is the embedded descriptor, rgd_offset the
# redundant grain directory, gd_offset may be GD_AT_END (stream-optimized),
# grain_offset is the first grain (metadata ends there), check_bytes is
# "\n \r\n" (newline detection).
VMDK4 = HeaderLayout(
    FORMAT,
    "<",
    (
        ("magic", "4s"),
        ("version", "I"),
        ("flags", "I"),
        ("capacity", "Q"),
        ("granularity", "Q"),
        ("desc_offset", "Q"),
        ("desc_size", "Q"),
        ("num_gtes_per_gt", "I"),
        ("rgd_offset", "Q"),
        ("gd_offset", "Q"),
        ("grain_offset", "Q"),
        ("filler", "c"),
        ("check_bytes", "4s"),
        ("compress_algorithm", "H"),
    ),
)
VMDK4_HEADER_SIZE = VMDK4.size


@dataclass(frozen=True, kw_only=True)
class Vmdk4Header:
    """The header of a hosted sparse extent (``KDMV``)."""

    version: int
    flags: int
    capacity: int
    granularity: int
    desc_offset: int
    desc_size: int
    num_gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    grain_offset: int
    compress_algorithm: int

    @property
    def compressed(self) -> bool:
        return self.compress_algorithm == COMPRESSION_DEFLATE


def parse_vmdk4_header(buf: bytes, *, base: int = 0) -> Vmdk4Header:
    """Parse the magic and header at the start of ``buf`` (``base`` is its file offset).

    Only the magic is checked here; the limits QEMU enforces are checked by
    the extent code, in QEMU's order, because some depend on the footer.
    """
    if len(buf) < VMDK4_HEADER_SIZE:
        raise CorruptImageError(
            fmt=FORMAT,
            field="header",
            offset=base,
            message=f"{len(buf)} bytes, a VMDK4 header needs {VMDK4_HEADER_SIZE}",
        )
    if buf[:4] != MAGIC_VMDK4:
        raise CorruptImageError(
            fmt=FORMAT, field="magic", offset=base, message=f"{buf[:4]!r} is not {MAGIC_VMDK4!r}"
        )
    (_m, version, flags, capacity, granularity, desc_offset, desc_size, gtes, rgd, gd, grain, _f,
     _c, compress) = VMDK4.unpack(buf)  # fmt: skip
    return Vmdk4Header(
        version=version,
        flags=flags,
        capacity=capacity,
        granularity=granularity,
        desc_offset=desc_offset,
        desc_size=desc_size,
        num_gtes_per_gt=gtes,
        rgd_offset=rgd,
        gd_offset=gd,
        grain_offset=grain,
        compress_algorithm=compress,
    )


# The magic and VMDK3Header ("COWD", ESX vmfsSparse): disk_sectors is the
# capacity, l1dir_offset (sectors) and l1dir_size (entries) the grain directory.
# QEMU uses a fixed 4096 entries per grain table for these extents.
VMDK3 = HeaderLayout(
    FORMAT,
    "<",
    (
        ("magic", "4s"),
        ("version", "I"),
        ("flags", "I"),
        ("disk_sectors", "I"),
        ("granularity", "I"),
        ("l1dir_offset", "I"),
        ("l1dir_size", "I"),
        ("file_sectors", "I"),
        ("cylinders", "I"),
        ("heads", "I"),
        ("sectors_per_track", "I"),
    ),
)
VMDK3_HEADER_SIZE = VMDK3.size
VMDK3_GTES_PER_GT = 4096


@dataclass(frozen=True, kw_only=True)
class CowdHeader:
    """The header of a VMFSSPARSE extent (``COWD``)."""

    version: int
    flags: int
    disk_sectors: int
    granularity: int
    l1dir_offset: int
    l1dir_size: int
    file_sectors: int


def parse_cowd_header(buf: bytes, *, base: int = 0) -> CowdHeader:
    """Parse the magic and header of a ``COWD`` extent at the start of ``buf``."""
    if len(buf) < VMDK3_HEADER_SIZE:
        raise CorruptImageError(
            fmt=FORMAT,
            field="header",
            offset=base,
            message=f"{len(buf)} bytes, a COWD header needs {VMDK3_HEADER_SIZE}",
        )
    if buf[:4] != MAGIC_VMDK3:
        raise CorruptImageError(
            fmt=FORMAT, field="magic", offset=base, message=f"{buf[:4]!r} is not {MAGIC_VMDK3!r}"
        )
    _m, version, flags, sectors, granularity, gd, gd_size, file_sectors, _c, _h, _s = VMDK3.unpack(
        buf
    )
    return CowdHeader(
        version=version,
        flags=flags,
        disk_sectors=sectors,
        granularity=granularity,
        l1dir_offset=gd,
        l1dir_size=gd_size,
        file_sectors=file_sectors,
    )


# A stream-optimized extent whose header says gd_offset == GD_AT_END keeps
# the real header in a footer, in the last three sectors (vmdk_open_vmdk4):
#
#   sector -3  footer marker: u64 val, u32 size = 0, u32 type = MARKER_FOOTER
#   sector -2  "KDMV" + VMDK4Header (the one that counts)
#   sector -1  end-of-stream marker: u64 val = 0, u32 size = 0, u32 type = 0
FOOTER_SIZE = 3 * SECTOR
_MARKER = struct.Struct("<QII")


def parse_footer(buf: bytes, *, base: int) -> Vmdk4Header:
    """The header held in a stream-optimized footer (``buf`` is its 1536 bytes)."""
    if len(buf) != FOOTER_SIZE:
        raise CorruptImageError(
            fmt=FORMAT,
            field="footer",
            offset=base,
            message=f"{len(buf)} bytes, expected {FOOTER_SIZE}",
        )
    _val, size, kind = _MARKER.unpack_from(buf, 0)
    eos_val, eos_size, eos_kind = _MARKER.unpack_from(buf, 2 * SECTOR)
    problems = []
    if buf[SECTOR : SECTOR + 4] != MAGIC_VMDK4:
        problems.append(f"magic {buf[SECTOR : SECTOR + 4]!r}")
    if size != 0 or kind != MARKER_FOOTER:
        problems.append(f"footer marker size {size} type {kind}")
    if (eos_val, eos_size, eos_kind) != (0, 0, MARKER_END_OF_STREAM):
        problems.append(f"end-of-stream marker {eos_val}/{eos_size}/{eos_kind}")
    if problems:
        raise CorruptImageError(
            fmt=FORMAT,
            field="footer",
            offset=base,
            message="invalid footer: " + ", ".join(problems),
        )
    return parse_vmdk4_header(buf[SECTOR : 2 * SECTOR], base=base + SECTOR)


# A compressed grain starts with a grain marker (when FLAG_MARKER is set):
#   u64 lba (guest sector), u32 size (bytes of deflate data), data[size]
GRAIN_MARKER_SIZE = 12
_GRAIN_MARKER = struct.Struct("<QI")


@dataclass(frozen=True, kw_only=True)
class GrainMarker:
    lba: int
    size: int


def parse_grain_marker(buf: bytes, *, base: int) -> GrainMarker:
    if len(buf) < GRAIN_MARKER_SIZE:
        raise CorruptImageError(
            fmt=FORMAT, field="grain marker", offset=base, message=f"only {len(buf)} bytes"
        )
    lba, size = _GRAIN_MARKER.unpack_from(buf, 0)
    return GrainMarker(lba=lba, size=size)


def parse_table(buf: bytes, count: int) -> tuple[int, ...]:
    """``count`` little-endian u32 entries (a grain directory or table)."""
    return struct.unpack_from(f"<{count}I", buf, 0)
