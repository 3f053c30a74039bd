"""The qcow2 format (QEMU's block/qcow2*.c), versions 2 and 3.

Specification: QEMU's docs/interop/qcow2.txt,
https://gitlab.com/qemu-project/qemu/-/blob/v7.2.0/docs/interop/qcow2.txt

Reads follow the two-level table (L1 -> L2 -> cluster) with zero clusters,
deflate-compressed clusters and an external data file; unallocated clusters
come from the backing chain, which the core opens from
:attr:`Qcow2Image.backing_filename`.  Writes allocate clusters at the end of
the file and keep refcounts exact, so ``qemu-img check`` stays clean; that is
enough for the overlays the model creates with :func:`create_image`.

The external data file name is handed to ``ctx.open_file`` as stored: QEMU
7.2's qcow2 passes it to ``bdrv_open_child`` unresolved, so a relative name
is relative to QEMU's working directory, not to the image (a known quirk;
the open context's contract says the same).

Limits, checked the way QEMU 7.2's ``qcow2_do_open`` checks them, are what
keep a hostile header from making us allocate or read gigabytes: the L1
table is at most 32 MiB, the refcount table 8 MiB, one cluster at most 2 MiB.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import Enum
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
from testbed.block.formats import read_checked
from testbed.block.formats.header import HeaderLayout, find
from testbed.errors import BlockError, CorruptImageError

FMT = "qcow2"
MAGIC = b"QFI\xfb"

# The header, big-endian (qcow2.txt "Header"); offsets follow from the order.
_HEADER_V2 = HeaderLayout(
    FMT,
    ">",
    (
        ("magic", "4s"),
        ("version", "I"),
        ("backing_file_offset", "Q"),
        ("backing_file_size", "I"),
        ("cluster_bits", "I"),
        ("size", "Q"),
        ("crypt_method", "I"),
        ("l1_size", "I"),
        ("l1_table_offset", "Q"),
        ("refcount_table_offset", "Q"),
        ("refcount_table_clusters", "I"),
        ("nb_snapshots", "I"),
        ("snapshots_offset", "Q"),
    ),
)
#: Version 3 only.
_HEADER_V3 = HeaderLayout(
    FMT,
    ">",
    (
        ("incompatible_features", "Q"),
        ("compatible_features", "Q"),
        ("autoclear_features", "Q"),
        ("refcount_order", "I"),
        ("header_length", "I"),
    ),
    start=_HEADER_V2.end,
)
#: Version 3 with header_length above 104 (padding follows, up to 112).
_HEADER_COMPRESSION = HeaderLayout(FMT, ">", (("compression_type", "B"),), start=_HEADER_V3.end)
_HEADER = (_HEADER_V2, _HEADER_V3, _HEADER_COMPRESSION)
V2_HEADER_LENGTH = _HEADER_V2.end  # 72
V3_HEADER_LENGTH = _HEADER_V3.end  # 104
#: QEMU's sizeof(QCowHeader): what qcow2_probe asks for and what it writes.
QEMU_HEADER_LENGTH = 112

#: The external data file: guest data only, its name used as stored (see the module doc).
DATA_FILE = ChildSpec(name="data-file", role=ChildRole.DATA, relative_to_parent=False)

# Header extensions: u32 type, u32 length, data padded to 8 bytes.
_EXT_HEADER = struct.Struct(">II")
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
_FEATURE = struct.Struct(">BB46s")

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

_INCOMPAT_NAMES = {
    0: "dirty bit",
    1: "corrupt bit",
    2: "external data file",
    3: "compression type",
    4: "extended L2 entries",
}

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023
MAX_BACKING_FORMAT = 15  # QEMU's bs->backing_format is char[16]

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
COMPRESSED_SECTOR = 512

#: How many L2 tables the image keeps parsed (each one cluster).
L2_CACHE_TABLES = 64


@dataclass(frozen=True, kw_only=True)
class Qcow2Header:
    """The fixed part of a qcow2 header, validated as QEMU's qcow2_do_open does."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = 0

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    @property
    def extensions_end(self) -> int:
        """Where header extensions must stop: the backing name or the first cluster's end."""
        return self.backing_file_offset or self.cluster_size

    @classmethod
    def parse(cls, buf: bytes) -> Qcow2Header:
        """Parse and validate the header at the start of ``buf``.

        ``buf`` is the start of the file (up to one cluster); anything
        wrong raises :class:`CorruptImageError` naming the field.
        """
        if len(buf) < V2_HEADER_LENGTH:
            raise CorruptImageError(
                fmt=FMT,
                field="header",
                offset=0,
                message=f"file of {len(buf)} bytes is too short for a qcow2 header",
            )
        fields = _HEADER_V2.unpack_dict(buf)
        magic = fields.pop("magic")
        version, cluster_bits = fields["version"], fields["cluster_bits"]
        if magic != MAGIC:
            raise _corrupt("magic", f"bad magic {magic!r}, expected {MAGIC!r}")
        if version not in (2, 3):
            raise _corrupt("version", f"unsupported qcow2 version {version}")
        if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise _corrupt(
                "cluster_bits",
                f"unsupported cluster_bits {cluster_bits} (cluster size must be "
                f"2**{MIN_CLUSTER_BITS} to 2**{MAX_CLUSTER_BITS})",
            )
        cluster_size = 1 << cluster_bits
        if version == 3:
            if len(buf) < V3_HEADER_LENGTH:
                raise CorruptImageError(
                    fmt=FMT,
                    field="header",
                    offset=0,
                    message=f"file of {len(buf)} bytes is too short for a v3 header",
                )
            v3 = _HEADER_V3.unpack_dict(buf)
            refcount_order, header_length = v3["refcount_order"], v3["header_length"]
            if header_length < V3_HEADER_LENGTH:
                raise _corrupt("header_length", f"header_length {header_length} is below 104")
            if header_length > cluster_size:
                raise _corrupt(
                    "header_length",
                    f"header_length {header_length} exceeds the cluster size {cluster_size}",
                )
            if refcount_order > 6:
                raise _corrupt("refcount_order", f"refcount_order {refcount_order} is above 6")
            compression_type = 0
            if header_length > V3_HEADER_LENGTH:
                if len(buf) <= V3_HEADER_LENGTH:
                    raise _corrupt("header_length", "header_length runs past the end of the file")
                compression_type = buf[V3_HEADER_LENGTH]
            fields.update(v3, compression_type=compression_type)
        header = cls(**fields)
        header._validate()
        return header

    def _validate(self) -> None:
        cs = self.cluster_size
        if self.backing_file_offset > cs:
            raise _corrupt(
                "backing_file_offset",
                f"backing_file_offset {self.backing_file_offset:#x} is beyond the first cluster",
            )
        if self.backing_file_offset and self.backing_file_size > min(
            MAX_BACKING_NAME, cs - self.backing_file_offset
        ):
            raise _corrupt(
                "backing_file_size",
                f"backing file name of {self.backing_file_size} bytes is too long",
            )
        if self.incompatible_features & INCOMPAT_EXTL2:
            raise _corrupt(
                "incompatible_features",
                "extended L2 entries (subclusters) are not supported by the model",
            )
        self._validate_compression()
        if self.crypt_method != 0:
            raise _corrupt(
                "crypt_method",
                f"crypt_method {self.crypt_method}: the model does not support encryption",
            )
        if self.refcount_table_clusters == 0:
            raise _corrupt(
                "refcount_table_clusters", "the image has no refcount table (0 clusters)"
            )
        _validate_table(
            self,
            "refcount_table",
            self.refcount_table_offset,
            self.refcount_table_clusters * cs,
            MAX_REFTABLE_BYTES,
        )
        if self.nb_snapshots > MAX_SNAPSHOTS:
            raise _corrupt("nb_snapshots", f"{self.nb_snapshots} snapshots, above {MAX_SNAPSHOTS}")
        if self.nb_snapshots and self.snapshots_offset % cs:
            raise _corrupt(
                "snapshots_offset",
                f"snapshots_offset {self.snapshots_offset:#x} is not cluster aligned",
            )
        _validate_table(self, "l1_table", self.l1_table_offset, self.l1_size * 8, MAX_L1_BYTES)
        if self.size >= 1 << 63:
            raise _corrupt("size", f"virtual size {self.size} is too large")
        per_l1 = cs * self.l2_entries
        needed = -(-self.size // per_l1)
        if self.l1_size < needed:
            raise _corrupt(
                "l1_size",
                f"l1_size {self.l1_size} is too small for a virtual size of {self.size} "
                f"(needs {needed})",
            )

    def _validate_compression(self) -> None:
        """The compression type and its incompatible feature bit must agree (QEMU 7.2)."""
        has_ct_bit = bool(self.incompatible_features & INCOMPAT_COMPRESSION)
        if self.compression_type != 0 and not has_ct_bit:
            raise _corrupt(
                "compression_type",
                f"compression_type {self.compression_type} without the compression type "
                "incompatible feature bit",
            )
        if has_ct_bit and self.compression_type == 0:
            raise _corrupt(
                "compression_type",
                "compression type feature bit set with the default (zlib) compression type",
            )
        if self.compression_type not in (0, 1):
            raise _corrupt("compression_type", f"unknown compression_type {self.compression_type}")
        if self.compression_type == 1:
            raise _corrupt("compression_type", "zstd compression is not supported by the model")


def _corrupt(name: str, message: str, *, field: str | None = None) -> CorruptImageError:
    """The error for header field ``name``, at its declared offset."""
    return find(_HEADER, name).corrupt(name, message, field=field)


def _validate_table(header: Qcow2Header, name: str, offset: int, nbytes: int, limit: int) -> None:
    # Both errors point at the header field that holds the table's offset.
    if nbytes > limit:
        raise _corrupt(
            f"{name}_offset",
            f"{name} of {nbytes} bytes is larger than the {limit} allowed",
            field=name,
        )
    if offset % header.cluster_size or offset + nbytes >= 1 << 63:
        raise _corrupt(f"{name}_offset", f"{name} offset {offset:#x} is invalid")


@dataclass(frozen=True, kw_only=True)
class Qcow2Extensions:
    """What the header extensions say (qcow2.txt "Header extensions")."""

    backing_format: str | None = None
    data_file: str | None = None
    #: (type, bit, name) from the feature name table; type 0 incompatible,
    #: 1 compatible, 2 autoclear.
    feature_names: tuple[tuple[int, int, str], ...] = ()
    #: Types of extensions the model does not interpret (bitmaps, crypto, unknown).
    other: tuple[int, ...] = ()

    @classmethod
    def parse(cls, buf: bytes, header: Qcow2Header) -> Qcow2Extensions:
        """Walk the extensions in ``buf`` (the file's first cluster, or less)."""
        offset = header.header_length
        end = header.extensions_end
        backing_format: str | None = None
        data_file: str | None = None
        features: list[tuple[int, int, str]] = []
        other: list[int] = []
        while offset < end:
            if offset + _EXT_HEADER.size > min(end, len(buf)):
                raise CorruptImageError(
                    fmt=FMT,
                    field="header extension",
                    offset=offset,
                    message="extension header runs past the extension area",
                )
            ext_type, length = _EXT_HEADER.unpack_from(buf, offset)
            data_offset = offset + _EXT_HEADER.size
            if length > end - data_offset or data_offset + length > len(buf):
                raise CorruptImageError(
                    fmt=FMT,
                    field="header extension",
                    offset=offset,
                    message=f"extension {ext_type:#010x} of {length} bytes is too large",
                )
            data = buf[data_offset : data_offset + length]
            if ext_type == EXT_END:
                break
            if ext_type == EXT_BACKING_FORMAT:
                if length > MAX_BACKING_FORMAT:
                    raise CorruptImageError(
                        fmt=FMT,
                        field="backing format extension",
                        offset=offset,
                        message=f"backing format of {length} bytes is too long "
                        f"(max {MAX_BACKING_FORMAT})",
                    )
                backing_format = _c_string(data)
            elif ext_type == EXT_DATA_FILE:
                data_file = _c_string(data)
            elif ext_type == EXT_FEATURE_TABLE:
                for pos in range(0, length - length % _FEATURE.size, _FEATURE.size):
                    ftype, bit, name = _FEATURE.unpack_from(data, pos)
                    features.append((ftype, bit, _c_string(name)))
            else:
                other.append(ext_type)
            offset = data_offset + (length + 7) // 8 * 8
        return cls(
            backing_format=backing_format,
            data_file=data_file,
            feature_names=tuple(features),
            other=tuple(other),
        )


def _check_unknown_features(header: Qcow2Header, extensions: Qcow2Extensions) -> None:
    """Refuse incompatible features the model does not know, by name when the image has one."""
    unknown = header.incompatible_features & ~INCOMPAT_KNOWN
    if not unknown:
        return
    table = {bit: name for ftype, bit, name in extensions.feature_names if ftype == 0}
    names = [table.get(bit, f"bit {bit}") for bit in range(64) if unknown >> bit & 1]
    raise _corrupt(
        "incompatible_features",
        f"unknown incompatible feature bits {unknown:#x} ({', '.join(names)})",
    )


def _c_string(data: bytes) -> str:
    """QEMU keeps these as C strings: stop at the first NUL."""
    return data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


class ClusterKind(Enum):
    UNALLOCATED = "unallocated"
    ZERO = "zero"
    ZERO_ALLOC = "zero (allocated)"
    COMPRESSED = "compressed"
    NORMAL = "normal"


class Qcow2Image(FormatImage):
    """An opened qcow2 image."""

    def __init__(
        self,
        file: BlockFile,
        header: Qcow2Header,
        extensions: Qcow2Extensions,
        l1: list[int],
        *,
        data_file: BlockFile | None,
        backing_filename: str | None,
        writable: bool,
    ) -> None:
        self.file = file
        self.header = header
        self.extensions = extensions
        self.l1 = l1
        self.data_file = data_file
        self.virtual_size = header.size // 512 * 512
        self.backing_filename = backing_filename
        self.backing_format = extensions.backing_format
        self.writable = writable
        self._cs = header.cluster_size
        self._l2_cache: dict[int, list[int]] = {}
        self._file_size = file.size()
        self._data_size = data_file.size() if data_file is not None else self._file_size
        # Allocation state, set up by the first write.
        self._reftable: list[int] | None = None
        self._next_free = 0

    # -- reading -----------------------------------------------------------

    def _l2_table(self, l1_index: int) -> tuple[int, list[int]] | None:
        entry = self.l1[l1_index]
        l2_offset = entry & L1E_OFFSET_MASK
        if not l2_offset:
            return None
        table = self._l2_cache.get(l2_offset)
        if table is None:
            where = self.header.l1_table_offset + 8 * l1_index
            if l2_offset % self._cs:
                raise CorruptImageError(
                    fmt=FMT,
                    field=f"l1_table[{l1_index}]",
                    offset=where,
                    message=f"L2 table offset {l2_offset:#x} is not cluster aligned",
                )
            raw = read_checked(
                self.file,
                l2_offset,
                self._cs,
                fmt=FMT,
                field=f"l1_table[{l1_index}]",
                file_size=self._file_size,
            )
            table = list(struct.unpack(f">{self.header.l2_entries}Q", raw))
            if len(self._l2_cache) >= L2_CACHE_TABLES:
                self._l2_cache.pop(next(iter(self._l2_cache)))
            self._l2_cache[l2_offset] = table
        return l2_offset, table

    def _lookup(self, cluster: int) -> tuple[ClusterKind, int, int]:
        """(kind, L2 entry, host offset of the cluster) for a guest cluster index."""
        l1_index, l2_index = divmod(cluster, self.header.l2_entries)
        found = self._l2_table(l1_index)
        if found is None:
            return ClusterKind.UNALLOCATED, 0, 0
        l2_offset, table = found
        entry = table[l2_index]
        where = l2_offset + 8 * l2_index
        if entry & OFLAG_COMPRESSED:
            if self.data_file is not None:
                raise CorruptImageError(
                    fmt=FMT,
                    field=f"L2 entry for guest cluster {cluster}",
                    offset=where,
                    message="compressed cluster in an image with an external data file",
                )
            return ClusterKind.COMPRESSED, entry, 0
        host = entry & L2E_OFFSET_MASK
        if entry & OFLAG_ZERO:
            kind = ClusterKind.ZERO_ALLOC if host else ClusterKind.ZERO
        elif host or (self.data_file is not None and entry & OFLAG_COPIED):
            # With a data file, host offset 0 is a real cluster; QEMU tells
            # it from "unallocated" by the COPIED flag.
            kind = ClusterKind.NORMAL
        else:
            return ClusterKind.UNALLOCATED, entry, 0
        if host % self._cs:
            raise CorruptImageError(
                fmt=FMT,
                field=f"L2 entry for guest cluster {cluster}",
                offset=where,
                message=f"cluster offset {host:#x} is not cluster aligned",
            )
        if kind is ClusterKind.NORMAL and host >= self._data_size:
            raise CorruptImageError(
                fmt=FMT,
                field=f"L2 entry for guest cluster {cluster}",
                offset=where,
                message=f"cluster offset {host:#x} is past the end of the "
                f"{'data file' if self.data_file is not None else 'file'} "
                f"({self._data_size} bytes)",
            )
        return kind, entry, host

    def _compressed_range(self, entry: int) -> tuple[int, int]:
        """(host offset, byte count) of a compressed cluster's data."""
        shift = 62 - (self.header.cluster_bits - 8)
        offset = entry & ((1 << shift) - 1)
        sectors = ((entry >> shift) & ((1 << (self.header.cluster_bits - 8)) - 1)) + 1
        return offset, sectors * COMPRESSED_SECTOR - (offset % COMPRESSED_SECTOR)

    def _decompress(self, cluster: int, entry: int) -> bytes:
        offset, length = self._compressed_range(entry)
        field = f"compressed cluster {cluster}"
        if offset >= self._file_size:
            raise CorruptImageError(
                fmt=FMT,
                field=field,
                offset=offset,
                message=f"compressed data at {offset:#x} is past the end of the file",
            )
        # The last compressed cluster may end inside its final sector,
        # past the end of the file: pread pads that with zeros, as QEMU's.
        data = self.file.pread(offset, length)
        try:
            inflater = zlib.decompressobj(wbits=-12)
            out = inflater.decompress(data, self._cs)
        except zlib.error as err:
            raise CorruptImageError(
                fmt=FMT, field=field, offset=offset, message=f"deflate data is corrupt: {err}"
            ) from err
        if len(out) != self._cs:
            raise CorruptImageError(
                fmt=FMT,
                field=field,
                offset=offset,
                message=f"deflate data expands to {len(out)} bytes, not one cluster of {self._cs}",
            )
        return out

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise BlockError(
                f"qcow2: request of {length} bytes at {offset} is outside the "
                f"{self.virtual_size}-byte image {self.file.filename}"
            )

    def read(self, offset: int, length: int, backing: BackingReader) -> bytes:
        self._check_range(offset, length)
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            cluster, in_cluster = divmod(pos, self._cs)
            n = min(self._cs - in_cluster, end - pos)
            kind, entry, host = self._lookup(cluster)
            if kind is ClusterKind.UNALLOCATED:
                out += backing(pos, n)
            elif kind in (ClusterKind.ZERO, ClusterKind.ZERO_ALLOC):
                out += bytes(n)
            elif kind is ClusterKind.COMPRESSED:
                out += self._decompress(cluster, entry)[in_cluster : in_cluster + n]
            else:
                source = self.data_file if self.data_file is not None else self.file
                out += source.pread(host + in_cluster, n)
            pos += n
        return bytes(out)

    # -- writing -----------------------------------------------------------

    def _writable_check(self) -> None:
        why = None
        if not self.writable:
            why = "it was opened read-only"
        elif self.data_file is not None:
            why = "it has an external data file"
        elif self.header.incompatible_features & INCOMPAT_DIRTY:
            why = "it is dirty and the model does not repair refcounts"
        elif self.header.refcount_order < 3:
            why = f"refcount_order {self.header.refcount_order} is below one byte"
        elif self.header.nb_snapshots:
            why = "it has internal snapshots (shared clusters)"
        if why:
            raise BlockError(f"qcow2: the model cannot write to {self.file.filename}: {why}")
        if self._reftable is None:
            h = self.header
            nbytes = h.refcount_table_clusters * self._cs
            raw = read_checked(
                self.file,
                h.refcount_table_offset,
                nbytes,
                fmt=FMT,
                field="refcount_table_offset",
                file_size=self._file_size,
            )
            self._reftable = list(struct.unpack(f">{nbytes // 8}Q", raw))
            self._next_free = -(-self._file_size // self._cs) * self._cs

    def _take_cluster(self) -> int:
        offset = self._next_free
        self._next_free += self._cs
        return offset

    def _adjust_refcount(self, host: int, delta: int) -> None:
        """Add ``delta`` to the refcount of the cluster at ``host``, making refblocks as needed."""
        assert self._reftable is not None
        width = (1 << self.header.refcount_order) // 8
        per_block = self._cs // width
        index, slot = divmod(host // self._cs, per_block)
        if index >= len(self._reftable):
            raise BlockError(
                f"qcow2: refcount table of {self.file.filename} is full "
                "(the model does not grow it)"
            )
        block = self._reftable[index] & REFT_OFFSET_MASK
        if not block:
            if delta < 0:
                raise CorruptImageError(
                    fmt=FMT,
                    field=f"refcount_table[{index}]",
                    offset=self.header.refcount_table_offset + 8 * index,
                    message=f"no refcount block for in-use cluster {host:#x}",
                )
            block = self._take_cluster()
            self.file.pwrite(block, bytes(self._cs))
            self._reftable[index] = block
            self.file.pwrite(
                self.header.refcount_table_offset + 8 * index, struct.pack(">Q", block)
            )
            self._adjust_refcount(block, 1)
        where = block + slot * width
        old = int.from_bytes(self.file.pread(where, width), "big")
        new = old + delta
        if new < 0:
            raise CorruptImageError(
                fmt=FMT,
                field=f"refcount of cluster {host:#x}",
                offset=where,
                message="refcount would drop below zero",
            )
        if new >= 1 << (8 * width):
            raise BlockError(f"qcow2: refcount of cluster {host:#x} would overflow")
        self.file.pwrite(where, new.to_bytes(width, "big"))

    def _allocate(self) -> int:
        offset = self._take_cluster()
        self._adjust_refcount(offset, 1)
        return offset

    def _ensure_l2(self, cluster: int) -> tuple[int, list[int]]:
        l1_index = cluster // self.header.l2_entries
        found = self._l2_table(l1_index)
        if found is not None:
            if not self.l1[l1_index] & OFLAG_COPIED:
                raise BlockError(
                    f"qcow2: L2 table {l1_index} of {self.file.filename} is shared; "
                    "the model does not copy L2 tables"
                )
            return found
        l2_offset = self._allocate()
        self.file.pwrite(l2_offset, bytes(self._cs))
        table = [0] * self.header.l2_entries
        self._l2_cache[l2_offset] = table
        self.l1[l1_index] = l2_offset | OFLAG_COPIED
        self.file.pwrite(
            self.header.l1_table_offset + 8 * l1_index, struct.pack(">Q", self.l1[l1_index])
        )
        return l2_offset, table

    def write(self, offset: int, data: bytes, backing: BackingReader) -> None:
        self._check_range(offset, len(data))
        self._writable_check()
        pos, end = offset, offset + len(data)
        while pos < end:
            cluster, in_cluster = divmod(pos, self._cs)
            n = min(self._cs - in_cluster, end - pos)
            chunk = data[pos - offset : pos - offset + n]
            kind, entry, host = self._lookup(cluster)
            if kind is ClusterKind.NORMAL and entry & OFLAG_COPIED:
                self.file.pwrite(host + in_cluster, chunk)
            else:
                self._write_new_cluster(cluster, in_cluster, chunk, kind, entry, host, backing)
            pos += n
        self._file_size = self._data_size = max(self._file_size, self.file.size())

    def _write_new_cluster(
        self,
        cluster: int,
        in_cluster: int,
        chunk: bytes,
        kind: ClusterKind,
        entry: int,
        host: int,
        backing: BackingReader,
    ) -> None:
        start = cluster * self._cs
        if len(chunk) == self._cs:
            content = chunk
        else:
            # Copy-on-write: the rest of the cluster keeps what the guest saw.
            visible = min(self._cs, self.virtual_size - start)
            old = self.read(start, visible, backing) + bytes(self._cs - visible)
            content = old[:in_cluster] + chunk + old[in_cluster + len(chunk) :]
        l2_offset, table = self._ensure_l2(cluster)
        new = self._allocate()
        self.file.pwrite(new, content)
        l2_index = cluster % self.header.l2_entries
        table[l2_index] = new | OFLAG_COPIED
        self.file.pwrite(l2_offset + 8 * l2_index, struct.pack(">Q", table[l2_index]))
        # Drop the reference the old mapping held.
        if kind is ClusterKind.COMPRESSED:
            coffset, length = self._compressed_range(entry)
            first = coffset // self._cs
            last = (coffset + length - 1) // self._cs
            for c in range(first, last + 1):
                self._adjust_refcount(c * self._cs, -1)
        elif kind in (ClusterKind.NORMAL, ClusterKind.ZERO_ALLOC):
            self._adjust_refcount(host, -1)
        self._file_size = self._data_size = max(self._file_size, self._next_free)


class Qcow2Driver(FormatDriver):
    """QEMU's ``qcow2`` format driver."""

    name: ClassVar[str] = "qcow2"
    children: ClassVar[tuple[ChildSpec, ...]] = (DATA_FILE,)
    creates_overlays: ClassVar[bool] = True
    creates_targets: ClassVar[bool] = True

    @classmethod
    def probe(cls, buf: bytes, filename: str) -> int:
        # qcow2_probe: a full header's worth of bytes, the magic, version >= 2.
        if (
            len(buf) >= QEMU_HEADER_LENGTH
            and buf[:4] == MAGIC
            and _HEADER_V2.unpack_dict(buf)["version"] >= 2
        ):
            return 100
        return 0

    @classmethod
    def create(
        cls,
        file: BlockFile,
        *,
        size: int,
        backing_file: str | None,
        backing_format: str | None,
    ) -> None:
        create_image(file, size=size, backing_file=backing_file, backing_format=backing_format)

    @classmethod
    def open(cls, file: BlockFile, ctx: OpenContext) -> Qcow2Image:
        file_size = file.size()
        header = Qcow2Header.parse(file.pread(0, min(file_size, QEMU_HEADER_LENGTH)))
        # Extensions live in the first cluster; past the end of a short
        # file there is nothing to read, so the parser sees the real length.
        first = file.pread(0, min(file_size, header.cluster_size))
        extensions = Qcow2Extensions.parse(first, header)
        _check_unknown_features(header, extensions)
        if header.incompatible_features & INCOMPAT_CORRUPT and not ctx.read_only:
            raise _corrupt(
                "incompatible_features",
                "the image is marked corrupt; it can only be opened read-only",
            )
        l1: list[int] = []
        if header.l1_size:
            raw = read_checked(
                file,
                header.l1_table_offset,
                header.l1_size * 8,
                fmt=FMT,
                field="l1_table_offset",
                file_size=file_size,
            )
            l1 = list(struct.unpack(f">{header.l1_size}Q", raw))
        data_file: BlockFile | None = None
        if header.incompatible_features & INCOMPAT_DATA_FILE:
            if not extensions.data_file:
                raise CorruptImageError(
                    fmt=FMT,
                    field="data file extension",
                    offset=header.header_length,
                    message="the external data file bit is set but the image names no data file",
                )
            data_file = ctx.open_file(extensions.data_file, child=DATA_FILE, relative_to=file)
        elif header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW:
            raise _corrupt(
                "autoclear_features", "data-file-raw is set without an external data file"
            )
        backing_filename: str | None = None
        if header.backing_file_offset:
            raw = read_checked(
                file,
                header.backing_file_offset,
                header.backing_file_size,
                fmt=FMT,
                field="backing_file_offset",
                file_size=file_size,
            )
            backing_filename = _c_string(raw)
        return Qcow2Image(
            file,
            header,
            extensions,
            l1,
            data_file=data_file,
            backing_filename=backing_filename,
            writable=not ctx.read_only,
        )


# -- creating ----------------------------------------------------------------

#: The feature name table QEMU 7.2 writes into new images (qcow2_update_header).
QEMU_FEATURE_TABLE: tuple[tuple[int, int, str], ...] = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)


def _extension(ext_type: int, data: bytes) -> bytes:
    pad = (-len(data)) % 8
    return _EXT_HEADER.pack(ext_type, len(data)) + data + bytes(pad)


def create_image(
    file: BlockFile,
    *,
    size: int,
    backing_file: str | None,
    backing_format: str | None,
    cluster_size: int = 65536,
) -> None:
    """Format the empty ``file`` as a qcow2 v3 image, laid out as qemu-img 7.2 does.

    Cluster 0 holds the header, the backing format extension, the feature
    name table (only above 4 KiB clusters, as QEMU) and the backing file
    name; cluster 1 the refcount table; cluster 2 the refcount block; the
    L1 table follows, and the file ends where the L1 table does.

    Long because it lays out the clusters in qemu-img's order, byte for
    byte, and reads beside ``qcow2_co_create``.
    """
    if cluster_size & (cluster_size - 1) or not (
        1 << MIN_CLUSTER_BITS <= cluster_size <= 1 << MAX_CLUSTER_BITS
    ):
        raise BlockError(f"qcow2: cluster size {cluster_size} is not a power of two in 512..2M")
    if size < 0 or size % 512:
        raise BlockError(f"qcow2: image size {size} is not a non-negative multiple of 512")
    if file.size():
        raise BlockError(f"qcow2: {file.filename} is not empty ({file.size()} bytes)")
    cluster_bits = cluster_size.bit_length() - 1
    l2_entries = cluster_size // 8
    l1_size = -(-size // (cluster_size * l2_entries))
    if l1_size * 8 > MAX_L1_BYTES:
        raise BlockError(f"qcow2: image size {size} needs an L1 table above 32 MiB")
    l1_clusters = -(-l1_size * 8 // cluster_size)
    l1_offset = 3 * cluster_size if l1_size else 0
    clusters = 3 + l1_clusters
    if clusters > cluster_size // 2:
        raise BlockError(f"qcow2: image size {size} needs more than one refcount block")

    extensions = b""
    if backing_format is not None:
        encoded = backing_format.encode()
        if not encoded or len(encoded) > MAX_BACKING_FORMAT:
            raise BlockError(f"qcow2: backing format {backing_format!r} is empty or too long")
        extensions += _extension(EXT_BACKING_FORMAT, encoded)
    if cluster_size > 4096:
        table = b"".join(
            _FEATURE.pack(ftype, bit, name.encode()) for ftype, bit, name in QEMU_FEATURE_TABLE
        )
        extensions += _extension(EXT_FEATURE_TABLE, table)
    extensions += _EXT_HEADER.pack(EXT_END, 0)
    backing_offset = QEMU_HEADER_LENGTH + len(extensions) if backing_file is not None else 0
    backing_name = b""
    if backing_file is not None:
        backing_name = backing_file.encode("utf-8", "surrogateescape")
        if not backing_name or len(backing_name) > MAX_BACKING_NAME or b"\0" in backing_name:
            raise BlockError(
                f"qcow2: backing file name {backing_file!r} is empty, too long or has NUL"
            )

    header = _HEADER_V2.pack(
        MAGIC,
        3,
        backing_offset,
        len(backing_name),
        cluster_bits,
        size,
        0,
        l1_size,
        l1_offset,
        cluster_size,
        1,
        0,
        0,
    ) + _HEADER_V3.pack(0, 0, 0, 4, QEMU_HEADER_LENGTH)
    header += bytes(QEMU_HEADER_LENGTH - len(header))  # compression_type 0 (zlib) + padding
    first = header + extensions + backing_name
    if len(first) > cluster_size:
        raise BlockError(
            f"qcow2: header, extensions and backing name ({len(first)} bytes) "
            f"do not fit in one {cluster_size}-byte cluster"
        )
    first += bytes(cluster_size - len(first))
    reftable = struct.pack(">Q", 2 * cluster_size) + bytes(cluster_size - 8)
    refblock = struct.pack(f">{clusters}H", *([1] * clusters))
    refblock += bytes(cluster_size - len(refblock))
    file.pwrite(0, first)
    file.pwrite(cluster_size, reftable)
    file.pwrite(2 * cluster_size, refblock)
    if l1_size:
        file.pwrite(l1_offset, bytes(l1_size * 8))
