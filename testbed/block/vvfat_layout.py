"""The FAT disk QEMU's vvfat builds from a host directory (QEMU 7.2).

A port of ``vvfat_open``'s geometry, ``init_directories``,
``read_directory``, ``init_fat``/``fat_set`` and ``init_mbr`` from QEMU
7.2 ``block/vvfat.c``.  Everything here is metadata built once at open
time; host *file contents* are never read here (they are read cluster by
cluster when the guest asks, see :mod:`testbed.block.vvfat`).

The directory scan uses ``os.scandir``/``os.stat`` like QEMU's
``opendir``/``readdir``/``stat``: such opens never go through
``qemu_open``, so no hook sees them.  Entries come in readdir order (QEMU
does not sort; on ext4 that is hash order).  ``os.scandir`` hides ``.`` and
``..``; the model stats ``dir/.`` and ``dir/..`` itself.  Where readdir
returns them does not change the disk (their entries have fixed places),
except for the "too many entries in root directory" check, which QEMU
makes for every readdir entry: the model makes it for real entries only.

Layout of the disk (sectors of 512 bytes)::

    0                      MBR (hard disk only; floppy: the boot sector)
    offset_to_bootsector   boot sector (0x3f on a hard disk, 0 on a floppy)
    offset_to_fat          FAT, sectors_per_fat sectors
    + sectors_per_fat      the second FAT (the same bytes)
    offset_to_root_dir     cluster 0: the root directory (clusters 0 and 1
                           for FAT12/16), then directories and files in the
                           order of the mapping list

QEMU's quirks kept on purpose: clusters are always 16 sectors (the floppy
branch's choice is overwritten), the boot sector is a FAT16 one even for
FAT32, and the first FAT byte is overwritten with the media type.
"""

from __future__ import annotations

import os
import stat as stat_mod
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from testbed.block import vvfat_names as names
from testbed.errors import BlockError

SECTOR = 0x200
SECTORS_PER_CLUSTER = 0x10
BOOTSECTOR_OEM_NAME = b"MSWIN4.1"
DEFAULT_LABEL = b"QEMU VVFAT"


@dataclass(frozen=True, kw_only=True)
class Geometry:
    """What ``vvfat_open`` derives from the options before scanning."""

    fat_type: int
    cylinders: int
    heads: int
    sectors: int
    offset_to_bootsector: int

    @property
    def total_sectors(self) -> int:
        return self.cylinders * self.heads * self.sectors


def geometry(*, fat_type: int, floppy: bool) -> Geometry:
    """``vvfat_open``: 2.88/1.44 MB floppy, or a 32 MB (FAT12) / 504 MB disk."""
    if floppy:
        if not fat_type:
            fat_type, secs = 12, 36
        else:
            secs = 18 if fat_type == 12 else 36
        cyls, heads, offset = 80, 2, 0
    else:
        if not fat_type:
            fat_type = 16
        offset = 0x3F
        cyls, heads, secs = (64 if fat_type == 12 else 1024), 16, 63
    if fat_type not in (12, 16, 32):
        raise BlockError(f"vvfat: valid FAT types are only 12, 16 and 32, not {fat_type}")
    return Geometry(
        fat_type=fat_type, cylinders=cyls, heads=heads, sectors=secs, offset_to_bootsector=offset
    )


@dataclass(kw_only=True)
class Mapping:
    """QEMU's ``mapping_t``: a host file or directory and its clusters [begin, end)."""

    begin: int
    end: int
    dir_index: int
    path: str
    is_directory: bool
    read_only: bool
    parent_index: int = -1
    first_dir_index: int = 0
    file_offset: int = 0  # in clusters; always 0 until a commit (not modelled)


@dataclass(kw_only=True)
class Layout:
    """The disk's metadata: boot sectors, FAT, directory entries, mappings."""

    geometry: Geometry
    label: bytes
    sectors_per_fat: int = 0
    offset_to_fat: int = 0
    offset_to_root_dir: int = 0
    root_entries: int = 0x02 * 0x10 * SECTORS_PER_CLUSTER
    sector_count: int = 0
    cluster_count: int = 0
    max_fat_value: int = 0
    first_sectors: bytearray = field(default_factory=lambda: bytearray(0x40 * SECTOR))
    fat: bytearray = field(default_factory=bytearray)
    #: All directory entries of all directories, 32 bytes each, as QEMU's
    #: ``s->directory``: a directory's clusters are a slice of it.
    directory: list[bytearray] = field(default_factory=list)
    mappings: list[Mapping] = field(default_factory=list)

    @property
    def fat_type(self) -> int:
        return self.geometry.fat_type

    @property
    def cluster_size(self) -> int:
        return SECTORS_PER_CLUSTER * SECTOR

    @property
    def total_sectors(self) -> int:
        return self.geometry.total_sectors

    def fat_set(self, cluster: int, value: int) -> None:
        if self.fat_type == 32:
            struct.pack_into("<I", self.fat, cluster * 4, value & 0xFFFFFFFF)
        elif self.fat_type == 16:
            struct.pack_into("<H", self.fat, cluster * 2, value & 0xFFFF)
        else:
            offset = cluster * 3 // 2
            if cluster & 1 == 0:
                self.fat[offset] = value & 0xFF
                self.fat[offset + 1] = (self.fat[offset + 1] & 0xF0) | ((value >> 8) & 0xF)
            else:
                self.fat[offset] = (self.fat[offset] & 0xF) | ((value & 0xF) << 4)
                self.fat[offset + 1] = (value >> 4) & 0xFF

    def fat_get(self, cluster: int) -> int:
        if self.fat_type == 32:
            return int(struct.unpack_from("<I", self.fat, cluster * 4)[0])
        if self.fat_type == 16:
            return int(struct.unpack_from("<H", self.fat, cluster * 2)[0])
        offset = cluster * 3 // 2
        pair = self.fat[offset] | (self.fat[offset + 1] << 8)
        return (pair >> (4 if cluster & 1 else 0)) & 0xFFF

    def directory_bytes(self, first_index: int, count: int) -> bytes:
        return b"".join(bytes(e) for e in self.directory[first_index : first_index + count])


def _stat_times(st: os.stat_result) -> tuple[int, int, int]:
    # time_t is the floor of the nanosecond time (also before 1970).
    return (
        st.st_ctime_ns // 1_000_000_000,
        st.st_atime_ns // 1_000_000_000,
        st.st_mtime_ns // 1_000_000_000,
    )


def _fill_entry(entry: bytearray, st: os.stat_result) -> None:
    ctime, atime, mtime = _stat_times(st)
    entry[11] = names.ATTR_DIRECTORY if stat_mod.S_ISDIR(st.st_mode) else names.ATTR_ARCHIVE
    entry[12] = entry[13] = 0
    struct.pack_into(
        "<HHHHHH",
        entry,
        14,
        names.fat_datetime(ctime, return_time=True),
        names.fat_datetime(ctime, return_time=False),
        names.fat_datetime(atime, return_time=False),
        0,
        names.fat_datetime(mtime, return_time=True),
        names.fat_datetime(mtime, return_time=False),
    )


def _add_named_entry(layout: Layout, directory_start: int, filename: str) -> bytearray:
    """``create_short_and_long_name`` for a real (not dot) name."""
    long_entries = names.long_name_entries(filename)
    layout.directory.extend(long_entries)
    existing = [
        bytes(e[0:11]) for e in layout.directory[directory_start:] if not names.is_long_name(e)
    ]
    short = names.short_name(filename, existing)
    chksum = names.fat_chksum(short)
    for e in long_entries:
        e[13] = chksum
    entry = names.short_entry(short)
    layout.directory.append(entry)
    return entry


#: The flags glibc's opendir() uses, which patch 0008 gives qemu_open.
DIRECTORY_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_DIRECTORY
#: Opens a directory for the scan (through the hook in the model).
OpenDir = Callable[[str], int]


def _open_directory(path: str) -> int:
    return os.open(path, DIRECTORY_FLAGS | os.O_CLOEXEC)


def _read_directory(layout: Layout, mapping_index: int, open_dir: OpenDir) -> None:
    mapping = layout.mappings[mapping_index]
    dirname = mapping.path
    # The series' extension patch 0008: the directory is opened with
    # qemu_open (so through the hook) and read with fdopendir; its entries
    # are stat'ed with fstatat relative to it.  Nothing else is opened
    # before it is closed.
    try:
        dirfd = open_dir(dirname)
    except OSError as err:
        mapping.end = mapping.begin
        raise BlockError(
            f"vvfat: could not read directory {dirname}: Could not open '{dirname}': {err.strerror}"
        ) from err
    try:
        _scan_directory(layout, mapping_index, dirfd)
    finally:
        os.close(dirfd)


def _list_directory(mapping: Mapping, dirfd: int) -> list[str]:
    try:
        with os.scandir(dirfd) as it:
            return [d.name for d in it]
    except OSError as err:
        mapping.end = mapping.begin
        raise BlockError(f"vvfat: could not read directory {mapping.path}: {err.strerror}") from err


def _scan_directory(layout: Layout, mapping_index: int, dirfd: int) -> None:
    mapping = layout.mappings[mapping_index]
    dirname = mapping.path
    dirents = _list_directory(mapping, dirfd)
    is_root = mapping.begin == 0
    i = mapping.first_dir_index = 0 if is_root else len(layout.directory)
    entries: list[tuple[str, str]] = []
    if not is_root:
        layout.directory.append(names.short_entry(b".          "))
        layout.directory.append(names.short_entry(b"..         "))
        entries += [(".", f"{dirname}/."), ("..", f"{dirname}/..")]
    entries += [(n, f"{dirname}/{n}") for n in dirents]
    for name, path in entries:
        if is_root and len(layout.directory) >= layout.root_entries - 1:
            raise BlockError(f"vvfat: too many entries in root directory {dirname}")
        try:
            st = os.stat(name, dir_fd=dirfd)
        except OSError:
            continue  # as QEMU: an entry that cannot be stat'ed is left out
        _add_entry(layout, mapping_index, i, name, path, st)
    _pad_directory(layout, mapping_index)


def _add_entry(
    layout: Layout, mapping_index: int, i: int, name: str, path: str, st: os.stat_result
) -> None:
    """The directory entry of ``name`` (``.`` and ``..`` exist already), and its mapping.

    ``i`` is the directory's first entry; a non-empty file or a directory
    gets a mapping, laid out when :func:`build_layout` reaches it.
    """
    mapping = layout.mappings[mapping_index]
    parent = layout.mappings[mapping.parent_index] if mapping.parent_index >= 0 else None
    is_dot, is_dotdot = name == ".", name == ".."
    if is_dot or is_dotdot:
        entry = layout.directory[i if is_dot else i + 1]
    else:
        entry = _add_named_entry(layout, i, name)
    _fill_entry(entry, st)
    if is_dotdot:
        names.set_begin(entry, parent.begin if parent is not None else -1)
    elif is_dot:
        names.set_begin(entry, mapping.begin)
    else:
        struct.pack_into("<H", entry, 26, 0)
    if st.st_size > 0x7FFFFFFF:
        raise BlockError(f"vvfat: file {path} is larger than 2GB")
    is_dir = stat_mod.S_ISDIR(st.st_mode)
    struct.pack_into("<I", entry, 28, 0 if is_dir else st.st_size)
    if not is_dot and not is_dotdot and (is_dir or st.st_size):
        layout.mappings.append(
            Mapping(
                begin=0,
                end=st.st_size,
                dir_index=len(layout.directory) - 1,
                path=path,
                is_directory=is_dir,
                read_only=(st.st_mode & 0o222) == 0,
                parent_index=mapping_index if is_dir else -1,
            )
        )


def _pad_directory(layout: Layout, mapping_index: int) -> None:
    """Fill the directory's last cluster (the root: all its entries) and set where it ends."""
    mapping = layout.mappings[mapping_index]
    per_cluster = 0x10 * SECTORS_PER_CLUSTER
    while len(layout.directory) % per_cluster:
        layout.directory.append(bytearray(names.ENTRY_SIZE))
    if layout.fat_type != 32 and mapping_index == 0:
        while len(layout.directory) < layout.root_entries:
            layout.directory.append(bytearray(names.ENTRY_SIZE))
    mapping.end = mapping.begin + (
        (len(layout.directory) - mapping.first_dir_index) * names.ENTRY_SIZE // layout.cluster_size
    )
    names.set_begin(layout.directory[mapping.dir_index], mapping.begin)


def _init_mbr(layout: Layout) -> None:
    geo = layout.geometry
    mbr = layout.first_sectors
    mbr[0:SECTOR] = bytes(SECTOR)
    struct.pack_into("<I", mbr, 0x1B8, 0xBE1AFDFA)  # Win NT disk signature
    part = 0x1BE
    mbr[part] = 0x80  # bootable

    def chs(spos: int) -> tuple[bytes, bool]:
        sector = spos % geo.sectors
        spos //= geo.sectors
        head = spos % geo.heads
        spos //= geo.heads
        if spos >= geo.cylinders:
            return b"\xff\xff\xff", True
        return bytes([head & 0xFF, ((sector + 1) | ((spos >> 8) << 6)) & 0xFF, spos & 0xFF]), False

    start, lba1 = chs(geo.offset_to_bootsector)
    end, lba2 = chs(geo.total_sectors - 1)
    lba = lba1 or lba2
    mbr[part + 1 : part + 4] = start
    mbr[part + 5 : part + 8] = end
    struct.pack_into(
        "<II", mbr, part + 8, geo.offset_to_bootsector, geo.total_sectors - geo.offset_to_bootsector
    )
    if layout.fat_type == 12:
        fs_type = 0x01
    elif layout.fat_type == 16:
        fs_type = 0x0E if lba else 0x06
    else:
        fs_type = 0x0C if lba else 0x0B
    mbr[part + 4] = fs_type
    mbr[510:512] = b"\x55\xaa"


def _init_bootsector(layout: Layout, sector_count: int) -> None:
    geo = layout.geometry
    base = geo.offset_to_bootsector * SECTOR
    bs = layout.first_sectors
    media = 0xF8 if geo.offset_to_bootsector > 0 else 0xF0
    struct.pack_into(
        "<3s8sHBHBHHBHHHII",
        bs,
        base,
        b"\xeb\x3e\x90",
        BOOTSECTOR_OEM_NAME,
        SECTOR,
        SECTORS_PER_CLUSTER,
        1,  # reserved sectors
        2,  # number of FATs
        layout.root_entries,
        0 if sector_count > 0xFFFF else sector_count,
        media,
        layout.sectors_per_fat & 0xFFFF,
        geo.sectors,
        geo.heads,
        geo.offset_to_bootsector,
        sector_count if sector_count > 0xFFFF else 0,
    )
    layout.fat[0] = media
    # The FAT16 extended boot record, even for FAT32 (a QEMU "LATER TODO").
    struct.pack_into(
        "<BBBI11s8s",
        bs,
        base + 36,
        0 if geo.offset_to_bootsector == 0 else 0x80,
        0,
        0x29,
        0xFABE1AFD,
        layout.label,
        b"FAT12   " if layout.fat_type == 12 else b"FAT16   ",
    )
    bs[base + 510 : base + 512] = b"\x55\xaa"


def _new_layout(geo: Geometry, label: bytes) -> Layout:
    """The layout's sizes, its volume label entry and an empty FAT (``init_fat``)."""
    if len(label) > 11:
        raise BlockError(f"vvfat label cannot be longer than 11 bytes: {label!r}")
    layout = Layout(geometry=geo, label=label.ljust(11, b" "))
    sector_count = geo.total_sectors - geo.offset_to_bootsector
    per_fat = 1 + SECTORS_PER_CLUSTER * SECTOR * 8 // geo.fat_type
    layout.sectors_per_fat = (sector_count + per_fat) // per_fat
    layout.offset_to_fat = geo.offset_to_bootsector + 1
    layout.offset_to_root_dir = layout.offset_to_fat + layout.sectors_per_fat * 2

    label_entry = bytearray(names.ENTRY_SIZE)
    label_entry[0:11] = layout.label
    label_entry[11] = names.ATTR_VOLUME_LABEL
    layout.directory.append(label_entry)

    # init_fat: FAT12 keeps 1.5 times the FAT's bytes (only the first
    # sectors_per_fat sectors are visible).
    if geo.fat_type == 12:
        fat_len = layout.sectors_per_fat * SECTOR * 3 // 2
    else:
        fat_len = layout.sectors_per_fat * SECTOR
    layout.fat = bytearray(fat_len + 32 * 4)
    layout.max_fat_value = {12: 0xFFF, 16: 0xFFFF, 32: 0x0FFFFFFF}[geo.fat_type]
    layout.cluster_count = (sector_count - layout.offset_to_root_dir) // SECTORS_PER_CLUSTER
    return layout


def _map_clusters(layout: Layout, dirname: str, open_dir: OpenDir, sector_count: int) -> None:
    """Give every mapping its clusters, reading directories as they come, and chain the FAT.

    A directory read appends the mappings of its entries, so the loop runs
    until no mapping is left unplaced (breadth first, as QEMU's).
    """
    cluster = 0
    i = 0
    while i < len(layout.mappings):
        fix_fat = i != 0
        mapping = layout.mappings[i]
        mapping.begin = cluster
        if mapping.is_directory:
            _read_directory(layout, i, open_dir)
        else:
            # A file mapping exists only for a non-empty file.
            mapping.end = cluster + 1 + (mapping.end - 1) // layout.cluster_size
            names.set_begin(layout.directory[mapping.dir_index], mapping.begin)
        cluster = mapping.end
        if cluster > layout.cluster_count:
            raise BlockError(
                f"vvfat: directory {dirname} does not fit in FAT{layout.geometry.fat_type} "
                f"(capacity {sector_count / 2000.0:.2f} MB)"
            )
        if fix_fat:
            for j in range(mapping.begin, mapping.end - 1):
                layout.fat_set(j, j + 1)
            layout.fat_set(mapping.end - 1, layout.max_fat_value)
        i += 1


def build_layout(
    dirname: str,
    geo: Geometry,
    label: bytes = DEFAULT_LABEL,
    *,
    open_dir: OpenDir = _open_directory,
) -> Layout:
    """``init_directories`` (+ ``init_mbr``): scan ``dirname`` and lay out the disk."""
    layout = _new_layout(geo, label)
    sector_count = geo.total_sectors - geo.offset_to_bootsector
    path = dirname[:-1] if dirname.endswith("/") else dirname
    layout.mappings.append(
        Mapping(begin=0, end=0, dir_index=0, path=path, is_directory=True, read_only=False)
    )
    _map_clusters(layout, dirname, open_dir, sector_count)
    layout.fat_set(0, layout.max_fat_value)
    layout.fat_set(1, layout.max_fat_value)
    _init_bootsector(layout, sector_count)
    layout.sector_count = layout.offset_to_root_dir + SECTORS_PER_CLUSTER * layout.cluster_count
    if geo.offset_to_bootsector > 0:
        _init_mbr(layout)
    return layout
