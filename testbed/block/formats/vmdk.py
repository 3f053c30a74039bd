"""The vmdk format, as QEMU 7.2's block/vmdk.c opens and reads it.

What the model reproduces, because it decides which files QEMU opens:

- ``bs->file`` is either a sparse extent (``KDMV``/``COWD`` magic:
  monolithicSparse, streamOptimized) or a text descriptor whose ``RW`` extent
  lines are opened one by one, in order, each through ``ctx.open_file``
  relative to the descriptor (see :mod:`vmdk_descriptor` for the sscanf
  quirks: RDONLY/NOACCESS/ZERO lines skipped, a blank line before an extent
  line opens it twice);
- a ``KDMV`` extent with capacity 0 and a descriptor offset holds a
  descriptor of its own, which QEMU follows recursively.  A file that
  names itself that way makes QEMU recurse until it runs out of file
  descriptors; the model stops at the first repeat with CorruptImageError;
- ``parentFileNameHint`` becomes ``backing_filename`` and the backing format
  is always ``vmdk`` (vmdk_parent_open hard-codes it), so the core opens the
  parent as vmdk without probing;
- a descriptor without ``CID`` and ``parentCID`` fails to open.

Where QEMU silently reads zeros past the end of a file on the strength of
a table offset (a grain directory, grain table or grain beyond EOF), the
model raises CorruptImageError instead: it never reads past a file because
a field said so.  QEMU also divides by zero on a ``COWD`` granularity that
makes the grain directory entry span 0 sectors; the model refuses it.
The parent CID check QEMU does on the first backing read is left to the
core (the image exposes ``cid`` and ``parent_cid``).

Structures: :mod:`testbed.block.formats.vmdk_layout`; descriptor text:
:mod:`testbed.block.formats.vmdk_descriptor`.
"""

from __future__ import annotations

import bisect
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

from testbed.block.driver import (
    BackingReader,
    BlockFile,
    ChildRole,
    ChildSpec,
    FormatDriver,
    FormatImage,
    OpenContext,
)
from testbed.block.formats.vmdk_descriptor import (
    DESC_SIZE,
    MAX_DESC_READ,
    cstring,
    iter_extent_lines,
    parse_cid,
    parse_create_type,
    parse_parent_hint,
    probe_text,
)
from testbed.block.formats.vmdk_layout import (
    FLAG_MARKER,
    FLAG_ZERO_GRAIN,
    FOOTER_SIZE,
    FORMAT,
    GD_AT_END,
    GRAIN_MARKER_SIZE,
    GTE_ZEROED,
    MAGIC_VMDK3,
    MAGIC_VMDK4,
    MAX_GD_ENTRIES,
    MAX_GRAIN_SECTORS,
    MAX_GTES_PER_GT,
    SECTOR,
    VMDK3,
    VMDK3_GTES_PER_GT,
    VMDK3_HEADER_SIZE,
    VMDK4,
    VMDK4_HEADER_SIZE,
    Vmdk4Header,
    parse_cowd_header,
    parse_footer,
    parse_grain_marker,
    parse_table,
    parse_vmdk4_header,
)
from testbed.errors import BlockError, CorruptImageError

#: Extent types whose file holds guest data only (QEMU's vmdk_parse_extents:
#: any other extent has metadata, so it is written whenever the node is writable).
_FLAT_TYPES = ("FLAT", "VMFS")
#: An extent file named in the descriptor: relative to the descriptor's file.
SPARSE_EXTENT = ChildSpec(name="extent", role=ChildRole.METADATA, relative_to_parent=True)
FLAT_EXTENT = ChildSpec(name="extent", role=ChildRole.DATA, relative_to_parent=True)

__all__ = ["Extent", "VmdkDriver", "VmdkImage"]

_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_INT64_MAX = (1 << 63) - 1
#: Nested descriptors (capacity-0 KDMV extents) deeper than this are a loop.
_MAX_NESTING = 8
#: Grain tables kept per image, like QEMU's L2_CACHE_SIZE.
_L2_CACHE = 16


@dataclass(frozen=True, kw_only=True)
class Extent:
    """One opened extent, in guest order.

    ``type`` is the descriptor's extent type (``FLAT``, ``VMFS``, ``SPARSE``,
    ``VMFSSPARSE``); a monolithic sparse image is one ``SPARSE`` extent in
    ``bs->file`` itself.  Sizes are in bytes, except the grain table fields.
    """

    file: BlockFile
    type: str
    start: int
    size: int
    #: FLAT/VMFS: where the extent's data starts in its file.
    flat_offset: int = 0
    # Sparse extents:
    grain_directory: tuple[int, ...] = ()
    gtes_per_gt: int = 0
    grain_sectors: int = 0
    compressed: bool = False
    has_marker: bool = False
    zero_grain: bool = False

    @property
    def flat(self) -> bool:
        return self.type in ("FLAT", "VMFS")

    @property
    def end(self) -> int:
        return self.start + self.size


class VmdkImage(FormatImage):
    """An opened vmdk: its extents, descriptor facts and a grain table cache."""

    def __init__(
        self,
        *,
        extents: list[Extent],
        create_type: str,
        desc_offset: int,
        backing_filename: str | None,
        cid: int,
        parent_cid: int,
    ) -> None:
        self.extents = tuple(extents)
        self.create_type = create_type
        self.desc_offset = desc_offset
        self.backing_filename = backing_filename
        # vmdk_parent_open always sets the backing format to vmdk.
        self.backing_format = "vmdk" if backing_filename else None
        self.cid = cid
        self.parent_cid = parent_cid
        self.virtual_size = extents[-1].end if extents else 0
        self._starts = [e.start for e in self.extents]
        self._tables: OrderedDict[tuple[int, int], tuple[int, ...]] = OrderedDict()

    def read(self, offset: int, length: int, backing: BackingReader) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise BlockError(
                f"vmdk: request of {length} bytes at {offset} is outside the "
                f"{self.virtual_size}-byte image"
            )
        out = bytearray()
        while length > 0:
            index = bisect.bisect_right(self._starts, offset) - 1
            extent = self.extents[index]
            rel = offset - extent.start
            if extent.flat:
                n = min(length, extent.end - offset)
                out += extent.file.pread(extent.flat_offset + rel, n)
            else:
                # Like vmdk_co_preadv, one grain at a time (even past the
                # extent's end, should its size not be whole grains).
                grain_bytes = extent.grain_sectors * SECTOR
                in_grain = rel % grain_bytes
                n = min(length, grain_bytes - in_grain)
                out += self._read_sparse(index, extent, rel, offset, in_grain, n, backing)
            offset += n
            length -= n
        return bytes(out)

    def _read_sparse(
        self,
        index: int,
        extent: Extent,
        rel: int,
        offset: int,
        in_grain: int,
        n: int,
        backing: BackingReader,
    ) -> bytes:
        sector = rel // SECTOR
        gd_index = sector // (extent.gtes_per_gt * extent.grain_sectors & _U32)
        if gd_index >= len(extent.grain_directory):
            raise CorruptImageError(
                fmt=FORMAT,
                field="grain directory",
                offset=None,
                message=f"{extent.file.filename}: sector {sector} needs directory entry {gd_index} "
                f"of {len(extent.grain_directory)}",
            )
        gt_sector = extent.grain_directory[gd_index]
        if gt_sector == 0:
            return backing(offset, n)
        table = self._grain_table(index, extent, gt_sector)
        entry = table[(sector // extent.grain_sectors) % extent.gtes_per_gt]
        if extent.zero_grain and entry == GTE_ZEROED:
            return bytes(n)
        if entry == 0:
            return backing(offset, n)
        if extent.compressed:
            return self._read_compressed(extent, entry * SECTOR, in_grain, n)
        where = entry * SECTOR + in_grain
        if where + n > extent.file.size():
            raise CorruptImageError(
                fmt=FORMAT,
                field="grain table entry",
                offset=gt_sector * SECTOR,
                message=f"{extent.file.filename}: grain at sector {entry} lies past the end of "
                "the file",
            )
        return extent.file.pread(where, n)

    def _grain_table(self, index: int, extent: Extent, gt_sector: int) -> tuple[int, ...]:
        key = (index, gt_sector)
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
            return table
        start, size = gt_sector * SECTOR, extent.gtes_per_gt * 4
        if start + size > extent.file.size():
            raise CorruptImageError(
                fmt=FORMAT,
                field="grain directory entry",
                offset=None,
                message=f"{extent.file.filename}: grain table at sector {gt_sector} lies past "
                f"the end of the file ({extent.file.size()} bytes)",
            )
        table = parse_table(extent.file.pread(start, size), extent.gtes_per_gt)
        self._tables[key] = table
        if len(self._tables) > _L2_CACHE:
            self._tables.popitem(last=False)
        return table

    def _read_compressed(self, extent: Extent, where: int, in_grain: int, n: int) -> bytes:
        grain_bytes = extent.grain_sectors * SECTOR
        file_size = extent.file.size()
        if where >= file_size:
            raise CorruptImageError(
                fmt=FORMAT,
                field="grain table entry",
                offset=None,
                message=f"{extent.file.filename}: compressed grain at {where} is past the end of "
                "the file",
            )
        # vmdk_read_extent reads two grains in case marker + data exceed one;
        # the part past the end of the file would read as zeros and is not
        # read here (the marker's size field decides what is used).
        buf = extent.file.pread(where, min(2 * grain_bytes, file_size - where))
        if extent.has_marker:
            data_len = parse_grain_marker(buf, base=where).size
            data = buf[GRAIN_MARKER_SIZE : GRAIN_MARKER_SIZE + data_len]
        else:
            data_len, data = grain_bytes, buf[:grain_bytes]
        if data_len == 0 or data_len > 2 * grain_bytes:
            raise CorruptImageError(
                fmt=FORMAT,
                field="grain marker",
                offset=where,
                message=f"compressed size {data_len} (grain is {grain_bytes})",
            )
        grain = _inflate(data, grain_bytes, where)
        if in_grain + n > len(grain):
            raise CorruptImageError(
                fmt=FORMAT,
                field="grain",
                offset=where,
                message=f"inflates to {len(grain)} bytes, read needs {in_grain + n}",
            )
        return grain[in_grain : in_grain + n]


def _inflate(data: bytes, limit: int, where: int) -> bytes:
    """zlib's uncompress() into a ``limit``-byte buffer: the whole stream or an error."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit)
        # The stream may still need input to reach its end after the
        # buffer filled; any further output means it did not fit.
        while not inflater.eof and inflater.unconsumed_tail:
            if inflater.decompress(inflater.unconsumed_tail, 1):
                raise CorruptImageError(
                    fmt=FORMAT,
                    field="grain",
                    offset=where,
                    message=f"inflates to more than the {limit}-byte grain",
                )
    except zlib.error as err:
        raise CorruptImageError(
            fmt=FORMAT, field="grain", offset=where, message=f"bad deflate data: {err}"
        ) from err
    if not inflater.eof:
        raise CorruptImageError(
            fmt=FORMAT, field="grain", offset=where, message="deflate stream ends early"
        )
    return out


def _read_desc(file: BlockFile, offset: int) -> bytes:
    """vmdk_read_desc: up to 1 MiB - 1 bytes at ``offset`` (zeros past EOF)."""
    size = file.size()
    if size < 4:
        raise CorruptImageError(
            fmt=FORMAT,
            field="file size",
            offset=0,
            message=f"{file.filename}: {size} bytes is too small for an image",
        )
    n = min(size, MAX_DESC_READ)
    return file.pread(offset, n) if offset < size else bytes(n)


class _Opener:
    """The state of one vmdk_open: the extents so far, in QEMU's order."""

    def __init__(self, file: BlockFile, ctx: OpenContext) -> None:
        self.file = file
        self.ctx = ctx
        self.extents: list[Extent] = []
        self.create_type: str | None = None
        self.nesting: list[str] = []

    @property
    def end(self) -> int:
        return self.extents[-1].end if self.extents else 0

    def add(self, extent: Extent) -> None:
        if extent.end > _INT64_MAX:
            raise CorruptImageError(
                fmt=FORMAT,
                field="extent size",
                offset=None,
                message=f"{extent.file.filename}: the disk would end at byte {extent.end}, past "
                "2**63",
            )
        self.extents.append(extent)

    def open_sparse(self, file: BlockFile, buf: bytes) -> None:
        """vmdk_open_sparse: dispatch on the magic of ``buf`` (the file's start)."""
        magic = buf[:4]
        if magic == MAGIC_VMDK3:
            self.open_cowd(file)
        elif magic == MAGIC_VMDK4:
            self.open_vmdk4(file)
        else:
            raise CorruptImageError(
                fmt=FORMAT,
                field="magic",
                offset=0,
                message=f"{file.filename}: {magic!r} is not a VMDK sparse extent",
            )

    def open_desc_file(self, text: bytes) -> None:
        """vmdk_open_desc_file: check createType, then open the extents in order."""
        self.create_type = parse_create_type(text)
        for spec in iter_extent_lines(text):
            name = os.fsdecode(spec.filename)
            # vmdk_parse_extents: only flat extents are data-only children
            kind = FLAT_EXTENT if spec.type in _FLAT_TYPES else SPARSE_EXTENT
            child = self.ctx.open_file(name, child=kind, relative_to=self.file)
            if spec.type in _FLAT_TYPES:
                offset = spec.flat_offset * SECTOR
                if offset + spec.sectors * SECTOR > _INT64_MAX:
                    raise CorruptImageError(
                        fmt=FORMAT,
                        field="extent line",
                        offset=spec.line_offset,
                        message=f"flat extent {name!r} at sector {spec.flat_offset} ends past "
                        "2**63",
                    )
                self.add(
                    Extent(
                        file=child,
                        type=spec.type,
                        start=self.end,
                        size=spec.sectors * SECTOR,
                        flat_offset=offset,
                    )
                )
            elif spec.type in ("SPARSE", "VMFSSPARSE"):
                self.open_sparse(child, _read_desc(child, 0))
            else:
                raise BlockError(f"vmdk: the model does not read seSparse extents ({name!r})")

    def open_cowd(self, file: BlockFile) -> None:
        """vmdk_open_vmfs_sparse: a COWD extent with 4096-entry grain tables."""
        header = parse_cowd_header(file.pread(0, VMDK3_HEADER_SIZE))
        if (VMDK3_GTES_PER_GT * header.granularity) & _U32 == 0:
            # QEMU would divide by zero on the first read.
            raise VMDK3.corrupt("granularity", f"{file.filename}: {header.granularity} sectors")
        self.add_sparse(
            file,
            type="VMFSSPARSE",
            sectors=header.disk_sectors,
            gd_sector=header.l1dir_offset,
            gd_entries=header.l1dir_size,
            gtes_per_gt=VMDK3_GTES_PER_GT,
            grain_sectors=header.granularity,
        )

    def open_vmdk4(self, file: BlockFile) -> None:
        """vmdk_open_vmdk4, its checks in QEMU's order."""
        header = parse_vmdk4_header(file.pread(0, VMDK4_HEADER_SIZE))
        if header.capacity == 0 and header.desc_offset:
            self.open_nested(file, header)
            return
        if self.create_type is None:
            self.create_type = "monolithicSparse"
        if header.gd_offset == GD_AT_END:
            where = -(-file.size() // SECTOR) * SECTOR - FOOTER_SIZE
            if where < 0:
                raise CorruptImageError(
                    fmt=FORMAT,
                    field="footer",
                    offset=None,
                    message=f"{file.filename}: too small for a footer",
                )
            header = parse_footer(file.pread(where, FOOTER_SIZE), base=where)
        if header.version > 3:
            raise VMDK4.corrupt(
                "version", f"{file.filename}: unsupported VMDK version {header.version}"
            )
        if header.version == 3 and not self.ctx.read_only and not header.compressed:
            raise BlockError(f"vmdk: {file.filename}: VMDK version 3 must be read only")
        if header.num_gtes_per_gt > MAX_GTES_PER_GT:
            raise VMDK4.corrupt(
                "num_gtes_per_gt",
                f"{file.filename}: {header.num_gtes_per_gt} entries, at most {MAX_GTES_PER_GT}",
            )
        gd_span = (header.num_gtes_per_gt * header.granularity) & _U32
        if gd_span == 0:
            raise VMDK4.corrupt(
                "granularity",
                f"{file.filename}: {header.num_gtes_per_gt} entries of "
                f"{header.granularity} sectors per grain table",
            )
        gd_entries = (((header.capacity + gd_span - 1) & _U64) // gd_span) & _U32
        if -(-file.size() // SECTOR) < header.grain_offset:
            raise VMDK4.corrupt(
                "grain_offset",
                f"{file.filename}: file truncated, expecting at least "
                f"{header.grain_offset * SECTOR} bytes, found {file.size()}",
            )
        if header.compressed:
            self.create_type = "streamOptimized"
        self.add_sparse(
            file,
            type="SPARSE",
            sectors=header.capacity,
            gd_sector=header.gd_offset,
            gd_entries=gd_entries,
            gtes_per_gt=header.num_gtes_per_gt,
            grain_sectors=header.granularity,
            compressed=header.compressed,
            has_marker=bool(header.flags & FLAG_MARKER),
            zero_grain=bool(header.flags & FLAG_ZERO_GRAIN),
        )
        # The redundant grain directory (FLAG_RGD) only matters to writes.

    def open_nested(self, file: BlockFile, header: Vmdk4Header) -> None:
        """A KDMV extent that is a descriptor in disguise: QEMU follows it."""
        name = os.path.normpath(file.filename)
        if name in self.nesting or len(self.nesting) >= _MAX_NESTING:
            chain = " -> ".join([*self.nesting, name])
            raise VMDK4.corrupt("desc_offset", f"extent loop through embedded descriptors: {chain}")
        self.nesting.append(name)
        text = _read_desc(file, header.desc_offset * SECTOR)
        self.open_desc_file(text)
        self.nesting.pop()

    def add_sparse(
        self,
        file: BlockFile,
        *,
        type: str,
        sectors: int,
        gd_sector: int,
        gd_entries: int,
        gtes_per_gt: int,
        grain_sectors: int,
        compressed: bool = False,
        has_marker: bool = False,
        zero_grain: bool = False,
    ) -> None:
        """vmdk_add_extent's limits, then vmdk_init_tables' directory read."""
        if grain_sectors > MAX_GRAIN_SECTORS:
            raise CorruptImageError(
                fmt=FORMAT,
                field="granularity",
                offset=None,
                message=f"{file.filename}: grains of {grain_sectors} sectors, at most "
                f"{MAX_GRAIN_SECTORS}",
            )
        if gd_entries > MAX_GD_ENTRIES:
            raise CorruptImageError(
                fmt=FORMAT,
                field="grain directory size",
                offset=None,
                message=f"{file.filename}: {gd_entries} entries, at most {MAX_GD_ENTRIES}",
            )
        start, size = gd_sector * SECTOR, gd_entries * 4
        if start + size > file.size():
            raise CorruptImageError(
                fmt=FORMAT,
                field="gd_offset",
                offset=None,
                message=f"{file.filename}: grain directory of {gd_entries} entries at sector "
                f"{gd_sector} ends past the end of the file ({file.size()} bytes)",
            )
        directory = parse_table(file.pread(start, size), gd_entries)
        self.add(
            Extent(
                file=file,
                type=type,
                start=self.end,
                size=sectors * SECTOR,
                grain_directory=directory,
                gtes_per_gt=gtes_per_gt,
                grain_sectors=grain_sectors,
                compressed=compressed,
                has_marker=has_marker,
                zero_grain=zero_grain,
            )
        )


class VmdkDriver(FormatDriver):
    """QEMU's ``vmdk`` format driver (reads; extents opened through the hook)."""

    name: ClassVar[str] = "vmdk"
    children: ClassVar[tuple[ChildSpec, ...]] = (SPARSE_EXTENT, FLAT_EXTENT)

    @classmethod
    def probe(cls, buf: bytes, filename: str) -> int:
        if len(buf) < 4:
            return 0
        if buf[:4] in (MAGIC_VMDK3, MAGIC_VMDK4):
            return 100
        return probe_text(buf)

    @classmethod
    def open(cls, file: BlockFile, ctx: OpenContext) -> VmdkImage:
        opener = _Opener(file, ctx)
        buf = _read_desc(file, 0)
        if buf[:4] in (MAGIC_VMDK3, MAGIC_VMDK4):
            opener.open_sparse(file, buf)
            desc_offset = 0x200
        else:
            opener.open_desc_file(cstring(buf))
            desc_offset = 0
        desc = file.pread(desc_offset, DESC_SIZE)
        backing = parse_parent_hint(desc, base=desc_offset)
        cid = parse_cid(desc, b"CID", base=desc_offset)
        parent_cid = parse_cid(desc, b"parentCID", base=desc_offset)
        return VmdkImage(
            extents=opener.extents,
            create_type=opener.create_type or "monolithicSparse",
            desc_offset=desc_offset,
            backing_filename=backing,
            cid=cid,
            parent_cid=parent_cid,
        )
