"""The ``fat:`` protocol driver (QEMU's vvfat) for the block-layer model.

vvfat has no ``bs->file``: it presents a host directory as a FAT disk.  The
metadata (MBR, boot sector, FAT, directories) is built at open time by
scanning the directory with ``opendir``/``readdir``/``stat``, which no
``qemu_open`` hook sees (:mod:`testbed.block.vvfat_layout`).  A host file is
opened through ``qemu_open(path, O_RDONLY)`` only when the guest reads one
of its clusters; one file is kept open at a time (``open_file`` in
vvfat.c): reading a cluster of another file opens that file and then closes
the previous one, reading a directory cluster closes the current file, and
reading the same file again keeps its fd.

Ported from QEMU 7.2 ``block/vvfat.c`` (``vvfat_parse_filename``,
``vvfat_open``, ``vvfat_read``, ``read_cluster``, ``open_file``,
``vvfat_write``).  Quirks kept because the bytes must equal QEMU's: the
cluster buffer is reused between files, so the tail of a file's last
cluster shows whatever the previous file read left there (QEMU's buffer
starts as uninitialised ``g_malloc`` memory; the model starts it zeroed),
and a cluster whose file cannot be opened reads as zeros, retried (one
more ``qemu_open``) for each of its sectors.

Write mode (``fat:rw:``) in QEMU creates a temporary file with
``g_mkstemp`` (``/var/tmp/vl.XXXXXX``, not through ``qemu_open``), formats
it as a qcow image with backing file ``fat:`` (512-byte clusters, so
allocation is per sector), opens it as the ``write-target`` child and
unlinks it; guest writes go there and reads of written sectors come from
it.  The model makes the same ``qemu_open`` calls on the temporary file
(probes, create ``O_RDWR|O_CREAT`` 0644, ``O_RDWR`` twice; the file comes
from ``make_temp`` when the core routes the ``g_mkstemp`` through the
hook), unlinks it, and keeps the written sectors in it raw (not in qcow
format) plus a set of written sectors.  It checks writes as
``vvfat_write`` does (the boot sector only lets its dirty byte change;
nothing below the FAT; no write to a read-only host file's clusters or
directory entry).  Not modelled: ``try_commit`` -- parsing the guest's
changed FAT and directories and writing them back to the host directory
(``O_RDWR|O_CREAT`` 0666 opens, rename, mkdir, unlink).  After a write
the host directory is unchanged and only reads of the written sectors see
the new data.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from testbed.block import vvfat_names as names
from testbed.block.vvfat_layout import (
    DEFAULT_LABEL,
    DIRECTORY_FLAGS,
    SECTOR,
    SECTORS_PER_CLUSTER,
    Layout,
    Mapping,
    build_layout,
    geometry,
)
from testbed.errors import BlockError

#: The flags vvfat's ``open_file`` passes: ``O_RDONLY | O_BINARY |
#: O_LARGEFILE``; O_BINARY is 0 on POSIX and O_LARGEFILE is 0 for 64-bit
#: glibc (QEMU's ``qemu_open_internal`` adds O_CLOEXEC itself).
HOST_FILE_FLAGS = os.O_RDONLY
#: Offset of the dirty byte (``reserved1``) in the FAT16 boot sector.
_BOOTSECTOR_RESERVED1 = 37

QemuOpen = Callable[[str, int, int], int]
MakeTemp = Callable[[], tuple[int, str]]


@dataclass(frozen=True, kw_only=True)
class VVFatOptions:
    """The vvfat options (``fat:[floppy:][12:|16:|32:][rw:]DIR`` or ``driver=vvfat``).

    ``fat_type`` 0 is QEMU's default: FAT12 on a floppy, FAT16 on a disk.
    ``label`` "" means QEMU's default label ``QEMU VVFAT``.
    """

    dirname: str
    fat_type: int = 0
    floppy: bool = False
    rw: bool = False
    label: str = ""

    def __post_init__(self) -> None:
        if not self.dirname:
            raise BlockError("vvfat block driver requires a 'dir' option")
        if self.fat_type not in (0, 12, 16, 32):
            raise BlockError(f"vvfat: valid FAT types are only 12, 16 and 32, not {self.fat_type}")
        if len(self.label.encode()) > 11:
            raise BlockError(f"vvfat label cannot be longer than 11 bytes: {self.label!r}")


def parse_fat_filename(filename: str) -> VVFatOptions:
    """``vvfat_parse_filename``: options from a ``fat:`` file name.

    Like QEMU, the option words are searched anywhere in the name
    (``:32:``, ``:16:``, ``:12:``, ``:floppy:``, ``:rw:``) and the directory
    is what follows the last colon (or, for ``X:`` after a colon, the DOS
    drive name onwards).
    """
    if not filename.startswith("fat:"):
        raise BlockError(f"File name string must start with 'fat:': {filename!r}")
    fat_type = 0
    if ":32:" in filename:
        fat_type = 32
    elif ":16:" in filename:
        fat_type = 16
    elif ":12:" in filename:
        fat_type = 12
    i = filename.rindex(":")
    if filename[i - 2] == ":" and filename[i - 1].isascii() and filename[i - 1].isalpha():
        dirname = filename[i - 1 :]
    else:
        dirname = filename[i + 1 :]
    return VVFatOptions(
        dirname=dirname,
        fat_type=fat_type,
        floppy=":floppy:" in filename,
        rw=":rw:" in filename,
    )


class VVFat:
    """An open ``fat:`` node: guest reads and writes of the virtual FAT disk."""

    def __init__(
        self,
        options: VVFatOptions,
        *,
        qemu_open: QemuOpen,
        make_temp: MakeTemp | None = None,
    ) -> None:
        self.options = options
        self._qemu_open = qemu_open
        geo = geometry(fat_type=options.fat_type, floppy=options.floppy)
        #: Guest-visible size in bytes (``bs->total_sectors`` * 512).
        self.virtual_size = geo.total_sectors * SECTOR
        self._current_mapping: Mapping | None = None
        self._current_fd = 0
        self._current_cluster = -1
        self._cluster_size = SECTORS_PER_CLUSTER * SECTOR
        self._cluster_buffer = bytearray(self._cluster_size)
        self._cluster: bytes | bytearray = self._cluster_buffer
        self._closed = False
        # vvfat_open creates the write target before it scans the directory.
        self._target_fd = -1
        self._written: set[int] = set()
        if options.rw:
            self._target_fd = self._create_write_target(make_temp)
        label = options.label.encode() if options.label else DEFAULT_LABEL
        try:
            self.layout: Layout = build_layout(
                options.dirname,
                geo,
                label,
                open_dir=lambda path: self._qemu_open(path, DIRECTORY_FLAGS, 0),
            )
        except BaseException:
            self._close_target()
            raise
        self._begins = [m.begin for m in self.layout.mappings]
        self._data_end = self.layout.mappings[-1].end

    # -- the write target --------------------------------------------------

    def _create_write_target(self, make_temp: MakeTemp | None) -> int:
        """``enable_write_target``: the opens QEMU makes for the write target.

        ``create_tmp_file`` makes the file with ``g_mkstemp`` and closes it;
        then the block layer creates the qcow image (host_cdrom probe, create
        ``O_RDWR|O_CREAT`` 0644), writes its header (probe, ``O_RDWR``) and
        opens it as the child (probe, ``O_RDWR``), all through ``qemu_open``;
        then unlinks it.  The model keeps the last fd, for its raw overlay.
        """
        if make_temp is not None:
            fd, path = make_temp()
        else:
            # create_tmp_file(): /var/tmp when the temp dir is /tmp.
            tmpdir = tempfile.gettempdir()
            if tmpdir == "/tmp":
                tmpdir = "/var/tmp"
            fd, path = tempfile.mkstemp(prefix="vl.", dir=tmpdir)
        os.close(fd)
        try:
            for step_flags, mode, keep in (
                (os.O_RDWR | os.O_CREAT, 0o644, False),  # bdrv_create: the file
                (os.O_RDWR, 0, False),  # qcow_co_create: the header
                (os.O_RDWR, 0, True),  # bdrv_open_child("write-target")
            ):
                self._probe(path)
                try:
                    target = self._qemu_open(path, step_flags, mode)
                except OSError as err:
                    raise BlockError(
                        f"vvfat: cannot open write target {path}: {err.strerror}"
                    ) from err
                if keep:
                    return target
                os.close(target)
            raise AssertionError("unreachable")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _probe(self, path: str) -> None:
        """The host_cdrom probe ``bdrv_find_protocol`` makes of a plain file name."""
        try:
            fd = self._qemu_open(path, os.O_RDONLY | os.O_NONBLOCK, 0)
        except OSError:
            return  # a failed probe only means "not a CD-ROM"
        os.close(fd)

    def _close_target(self) -> None:
        if self._target_fd >= 0:
            os.close(self._target_fd)
            self._target_fd = -1

    # -- reads -------------------------------------------------------------

    @property
    def current_path(self) -> str | None:
        """The host file whose fd is open now (None when none is)."""
        if self._current_mapping is None or self._current_fd == 0:
            return None
        return self._current_mapping.path

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if self._closed:
            raise BlockError(f"vvfat {self.options.dirname}: {what} after close")
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise BlockError(
                f"vvfat {self.options.dirname}: {what} of {length} bytes at {offset} "
                f"is outside the disk ({self.virtual_size} bytes)"
            )

    def read(self, offset: int, length: int) -> bytes:
        """Guest-visible bytes; unaligned requests read whole sectors, as the block layer."""
        self._check_range(offset, length, "read")
        if length == 0:
            return b""
        first = offset // SECTOR
        last = (offset + length - 1) // SECTOR
        data = self._read_sectors(first, last - first + 1)
        start = offset - first * SECTOR
        return data[start : start + length]

    def _read_sectors(self, sector_num: int, nb_sectors: int) -> bytes:
        """``vvfat_read``, taking runs of sectors at once where QEMU's state cannot change."""
        layout = self.layout
        out = bytearray()
        sector, end = sector_num, sector_num + nb_sectors
        while sector < end:
            if sector in self._written:
                out += os.pread(self._target_fd, SECTOR, sector * SECTOR)
                sector += 1
                continue
            if sector < layout.offset_to_root_dir:
                if sector < layout.offset_to_fat:
                    out += layout.first_sectors[sector * SECTOR : (sector + 1) * SECTOR]
                else:
                    # Both FATs show the same bytes.
                    fat_sector = (sector - layout.offset_to_fat) % layout.sectors_per_fat
                    out += layout.fat[fat_sector * SECTOR : (fat_sector + 1) * SECTOR]
                sector += 1
                continue
            cluster_num, in_cluster = divmod(
                sector - layout.offset_to_root_dir, SECTORS_PER_CLUSTER
            )
            # Past the last mapping no cluster belongs to anything: QEMU's
            # read_cluster fails there without changing its state.
            run = end - sector if cluster_num >= self._data_end else 0
            if run and self._written:
                run = min([s for s in self._written if sector < s < end], default=end) - sector
            if run:
                out += bytes(run * SECTOR)
                sector += run
                continue
            if cluster_num > layout.cluster_count or not self._read_cluster(cluster_num):
                out += bytes(SECTOR)
                sector += 1
                continue
            # The rest of this cluster comes from the same buffer.
            run = 1 if self._written else min(SECTORS_PER_CLUSTER - in_cluster, end - sector)
            out += self._cluster[in_cluster * SECTOR : (in_cluster + run) * SECTOR]
            sector += run
        return bytes(out)

    def _find_mapping(self, cluster_num: int) -> Mapping | None:
        index = bisect.bisect_right(self._begins, cluster_num) - 1
        if index < 0:
            return None
        mapping = self.layout.mappings[index]
        return mapping if mapping.begin <= cluster_num < mapping.end else None

    def _close_current_file(self) -> None:
        if self._current_mapping is not None:
            self._current_mapping = None
            if self._current_fd:
                os.close(self._current_fd)
                self._current_fd = 0
        self._current_cluster = -1

    def _open_file(self, mapping: Mapping | None) -> bool:
        if mapping is None:
            return False
        current = self._current_mapping
        if current is None or current.path != mapping.path:
            try:
                fd = self._qemu_open(mapping.path, HOST_FILE_FLAGS, 0)
            except OSError:
                return False
            # The new file is opened before the old one is closed.
            self._close_current_file()
            self._current_fd = fd
        self._current_mapping = mapping
        return True

    def _read_cluster(self, cluster_num: int) -> bool:
        """``read_cluster``: point ``self._cluster`` at cluster ``cluster_num``."""
        if self._current_cluster == cluster_num:
            return True
        current = self._current_mapping
        if current is None or current.begin > cluster_num or current.end <= cluster_num:
            mapping = self._find_mapping(cluster_num)
            if mapping is not None and mapping.is_directory:
                self._close_current_file()
                self._current_mapping = mapping
                return self._read_directory_cluster(mapping, cluster_num)
            if not self._open_file(mapping):
                return False
        elif current.is_directory:
            return self._read_directory_cluster(current, cluster_num)
        mapping = self._current_mapping
        assert mapping is not None and self._current_fd
        offset = self._cluster_size * (cluster_num - mapping.begin + mapping.file_offset)
        try:
            data = os.pread(self._current_fd, self._cluster_size, offset)
        except OSError:
            self._current_cluster = -1
            return False
        # A short read (the file's last cluster) leaves the buffer's tail as
        # the previous read left it, as in QEMU.
        self._cluster_buffer[: len(data)] = data
        self._cluster = self._cluster_buffer
        self._current_cluster = cluster_num
        return True

    def _read_directory_cluster(self, mapping: Mapping, cluster_num: int) -> bool:
        per_cluster = self._cluster_size // names.ENTRY_SIZE
        first = mapping.first_dir_index + (cluster_num - mapping.begin) * per_cluster
        self._cluster = self.layout.directory_bytes(first, per_cluster)
        self._current_cluster = cluster_num
        return True

    # -- writes ------------------------------------------------------------

    def write(self, offset: int, data: bytes) -> None:
        """A guest write (``fat:rw:`` only), checked as ``vvfat_write`` does."""
        self._check_range(offset, len(data), "write")
        if self._target_fd < 0:
            raise BlockError(f"vvfat {self.options.dirname} is read-only (no rw option)")
        if not data:
            return
        first = offset // SECTOR
        last = (offset + len(data) - 1) // SECTOR
        head = offset - first * SECTOR
        if head or (offset + len(data)) % SECTOR:
            # The block layer pads an unaligned write by reading the edges.
            buf = bytearray(self._read_sectors(first, last - first + 1))
            buf[head : head + len(data)] = data
            data = bytes(buf)
        self._write_sectors(first, data)

    def _write_sectors(self, sector_num: int, buf: bytes) -> None:
        layout = self.layout
        nb_sectors = len(buf) // SECTOR
        self._close_current_file()
        boot = layout.geometry.offset_to_bootsector
        if sector_num == boot and nb_sectors == 1:
            base = boot * SECTOR
            current = layout.first_sectors[base : base + SECTOR]
            for i in range(SECTOR):
                if i != _BOOTSECTOR_RESERVED1 and current[i] != buf[i]:
                    raise BlockError(
                        f"vvfat {self.options.dirname}: tried to write to protected "
                        f"bootsector (byte {i})"
                    )
            layout.first_sectors[base + _BOOTSECTOR_RESERVED1] = buf[_BOOTSECTOR_RESERVED1]
            return
        if sector_num < layout.offset_to_fat:
            raise BlockError(
                f"vvfat {self.options.dirname}: write to sector {sector_num}, before the FAT"
            )
        first_cluster = (sector_num - layout.offset_to_root_dir) // SECTORS_PER_CLUSTER
        last_cluster = (sector_num + nb_sectors - 1 - layout.offset_to_root_dir) // (
            SECTORS_PER_CLUSTER
        )
        i = first_cluster
        while i <= last_cluster:
            mapping = self._find_mapping(i) if i >= 0 else None
            if mapping is None:
                i += 1
                continue
            if mapping.read_only:
                raise BlockError(f"vvfat: tried to write to write-protected file {mapping.path}")
            if mapping.is_directory:
                self._check_directory_write(mapping, i, sector_num, buf)
            i = mapping.end
        os.pwrite(self._target_fd, buf, sector_num * SECTOR)
        self._written.update(range(sector_num, sector_num + nb_sectors))

    def _check_directory_write(
        self, mapping: Mapping, cluster: int, sector_num: int, buf: bytes
    ) -> None:
        """No write may change the directory entry of a read-only (attribute 1) file."""
        layout = self.layout
        begin = layout.offset_to_root_dir + SECTORS_PER_CLUSTER * cluster
        end = begin + SECTORS_PER_CLUSTER
        begin = max(begin, sector_num)
        end = min(end, sector_num + len(buf) // SECTOR)
        # As vvfat.c computes it (mapping->begin counted in sectors from the
        # directory's dir_index); kept even where it looks odd.
        dir_index = mapping.dir_index + 0x10 * (begin - mapping.begin * SECTORS_PER_CLUSTER)
        base = SECTOR * (begin - sector_num)
        for k in range(max(0, end - begin) * 0x10):
            new = buf[base + k * 32 : base + (k + 1) * 32]
            is_short = new[11] not in (names.ATTR_VOLUME_LABEL, names.ATTR_LONG_NAME) and new[
                0
            ] not in (0x00, names.DIR_KANJI)
            if is_short and new[11] & 1:
                index = dir_index + k
                old = bytes(layout.directory[index]) if 0 <= index < len(layout.directory) else b""
                if new != old:
                    raise BlockError(
                        f"vvfat {self.options.dirname}: tried to write to write-protected file"
                    )

    # -- close -------------------------------------------------------------

    def close(self) -> None:
        """Close the host file and the write target (``vvfat_close``)."""
        if self._closed:
            return
        self._close_current_file()
        self._close_target()
        self._closed = True

    def __enter__(self) -> VVFat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
