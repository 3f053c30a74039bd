"""The vvfat (``fat:``) model against QEMU 7.2's vvfat.

Oracles: ``qemu-img convert -O raw 'fat:...DIR'`` for the disk bytes, and
``strace -e trace=openat,close qemu-io -r`` for which host files QEMU opens,
with which flags, in which order.  The trees are the recipes of
``images/manifest.d/vvfat.toml``, plus small ones made here.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.block import vvfat as vvfat_module
from testbed.block import vvfat_names as names
from testbed.block.vvfat import HOST_FILE_FLAGS, VVFat, VVFatOptions, parse_fat_filename
from testbed.block.vvfat_layout import DIRECTORY_FLAGS, SECTOR, SECTORS_PER_CLUSTER, Mapping
from testbed.errors import BlockError
from testbed.pytest_plugin import require

CHUNK = 2 << 20  # qemu-img convert's default buffer: the model reads in the same order
CLUSTER = SECTORS_PER_CLUSTER * SECTOR


class Recorder:
    """A ``qemu_open`` stub that opens for real and records each call."""

    def __init__(self, refuse: set[str] | None = None) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.fds: dict[int, str] = {}
        #: ("open" | "close", path) in the order they happened (closes only
        #: under :func:`watch_closes`).
        self.events: list[tuple[str, str]] = []
        self.refuse = refuse or set()
        #: The directory scan's opens (patch 0008), kept apart from the host
        #: files' so that the tests of file opens read as before.
        self.scans: list[str] = []

    def __call__(self, path: str, flags: int, mode: int) -> int:
        if flags == DIRECTORY_FLAGS:
            self.scans.append(path)
            return os.open(path, flags | os.O_CLOEXEC)
        self.calls.append((path, flags, mode))
        if path in self.refuse:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)
        fd = os.open(path, flags | os.O_CLOEXEC, mode)
        self.fds[fd] = path
        self.events.append(("open", path))
        return fd

    def paths(self) -> list[str]:
        return [p for p, _, _ in self.calls]


class _ClosingOs:
    """Stands in for ``os`` inside testbed.block.vvfat: records closes of recorded fds."""

    def __init__(self, rec: Recorder) -> None:
        self._rec = rec

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def close(self, fd: int) -> None:
        if fd in self._rec.fds:
            self._rec.events.append(("close", self._rec.fds.pop(fd)))
        os.close(fd)


@contextlib.contextmanager
def watch_closes(monkeypatch: pytest.MonkeyPatch, rec: Recorder) -> Iterator[None]:
    with monkeypatch.context() as m:
        m.setattr(vvfat_module, "os", _ClosingOs(rec))
        yield


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def make_tree(root: Path) -> Path:
    """A small tree: three files of one, two and a partial cluster, and a folder."""
    tree = root / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "two.bin").write_bytes(bytes((i * 7) % 251 for i in range(CLUSTER + 100)))
    (tree / "one.txt").write_bytes(b"one\n")
    (tree / "sub" / "inner.bin").write_bytes(b"\x5a" * 3000)
    for p in [tree, *tree.rglob("*")]:
        os.utime(p, (4070908800, 1623760496))  # atime 2099 (relatime keeps it), fixed mtime
    return tree


def mapping(vv: VVFat, name: str) -> Mapping:
    for m in vv.layout.mappings:
        if os.path.basename(m.path) == name:
            return m
    raise AssertionError(f"no mapping for {name}")


def cluster_offset(vv: VVFat, cluster: int) -> int:
    return (vv.layout.offset_to_root_dir + SECTORS_PER_CLUSTER * cluster) * SECTOR


# -- pure parts ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("fat:/d", VVFatOptions(dirname="/d")),
        ("fat:16:/d/e", VVFatOptions(dirname="/d/e", fat_type=16)),
        ("fat:floppy:12:/x", VVFatOptions(dirname="/x", fat_type=12, floppy=True)),
        ("fat:32:rw:/x", VVFatOptions(dirname="/x", fat_type=32, rw=True)),
        ("fat:rw:floppy:rel", VVFatOptions(dirname="rel", floppy=True, rw=True)),
        ("fat:16:C:\\dos", VVFatOptions(dirname="C:\\dos", fat_type=16)),
    ],
)
def test_parse_fat_filename(filename: str, expected: VVFatOptions) -> None:
    assert parse_fat_filename(filename) == expected


@pytest.mark.parametrize("filename", ["raw:/d", "/d", "fat:"])
def test_parse_fat_filename_refuses(filename: str) -> None:
    with pytest.raises(BlockError):
        parse_fat_filename(filename)


def test_options_validate() -> None:
    with pytest.raises(BlockError, match="FAT types"):
        VVFatOptions(dirname="/d", fat_type=8)
    with pytest.raises(BlockError, match="11 bytes"):
        VVFatOptions(dirname="/d", label="TWELVE BYTES")


@pytest.mark.parametrize(
    ("filename", "taken", "short"),
    [
        ("readme.txt", [], b"README  TXT"),
        ("Long File Name 1.txt", [], b"LONGFI~1TXT"),
        ("Long File Name 2.txt", [b"LONGFI~1TXT"], b"LONGFI~2TXT"),
        ("README.TXT", [b"README  TXT"], b"README~1TXT"),
        ("archive.tar.gz", [], b"ARCHIV~1GZ "),
        (".hidden", [], b"HIDDEN~1   "),
        ("\u0124at.txt", [], b"$AT     TXT"),  # strchr sees the low byte 0x24
        (
            "x" * 8 + ".y",
            [b"XXXXXXXXY  "] + [b"XXXXXX~%dY  " % i for i in range(1, 10)],
            b"XXXXX~10Y  ",
        ),
    ],
)
def test_short_names(filename: str, taken: list[bytes], short: bytes) -> None:
    assert names.short_name(filename, taken) == short


def test_long_name_entries() -> None:
    entries = names.long_name_entries("Long File Name 1.txt")  # 20 UTF-16 units: 2 entries
    assert [e[0] for e in entries] == [0x42, 0x01]
    assert all(e[11] == names.ATTR_LONG_NAME for e in entries)
    first, tail = entries[1], entries[0]  # the last entry holds the start of the name
    assert first[1:11] + first[14:26] + first[28:32] == "Long File Nam".encode("utf-16-le")
    assert tail[1:11] == "e 1.t".encode("utf-16-le")
    assert tail[14:18] == "xt".encode("utf-16-le") and tail[18:20] == b"\0\0"
    assert tail[20:26] == b"\xff" * 6 and tail[28:32] == b"\xff" * 4
    assert first[26:28] == tail[26:28] == b"\0\0"


def test_fat_datetime_is_local_time() -> None:
    t = int(time.mktime((2021, 6, 15, 12, 34, 56, 0, 0, -1)))
    assert names.fat_datetime(t, return_time=True) == (12 << 11) | (34 << 5) | 28
    assert names.fat_datetime(t, return_time=False) == 15 | (6 << 5) | (41 << 9)


@pytest.mark.parametrize(
    ("filename", "size"),
    [
        ("fat:floppy:", 80 * 2 * 36 * SECTOR),  # 2.88 MB
        ("fat:floppy:12:", 80 * 2 * 18 * SECTOR),  # 1.44 MB
        ("fat:12:", 64 * 16 * 63 * SECTOR),  # 31.5 MiB
        ("fat:", 1024 * 16 * 63 * SECTOR),  # 504 MiB
        ("fat:32:", 1024 * 16 * 63 * SECTOR),
    ],
)
def test_virtual_size(tmp_path: Path, filename: str, size: int) -> None:
    tree = make_tree(tmp_path)
    with VVFat(parse_fat_filename(filename + str(tree)), qemu_open=Recorder()) as vv:
        assert vv.virtual_size == size


# -- host file opens ----------------------------------------------------------


def test_host_files_opened_only_for_their_clusters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = make_tree(tmp_path)
    two_path, one_path = str(tree / "two.bin"), str(tree / "one.txt")
    rec = Recorder()
    with (
        watch_closes(monkeypatch, rec),
        VVFat(parse_fat_filename(f"fat:16:{tree}"), qemu_open=rec) as vv,
    ):
        # The scan (patch 0008): each directory through qemu_open, in QEMU's order.
        assert rec.scans == [str(tree), str(tree / "sub")]
        # MBR, boot sector, FATs and the root directory: no host file.
        vv.read(0, cluster_offset(vv, 2))
        assert rec.calls == []
        two, one = mapping(vv, "two.bin"), mapping(vv, "one.txt")
        assert two.end - two.begin == 2

        assert vv.read(cluster_offset(vv, two.begin), 4) == bytes([0, 7, 14, 21])
        assert rec.calls == [(two_path, HOST_FILE_FLAGS, 0)]
        assert HOST_FILE_FLAGS == os.O_RDONLY
        vv.read(cluster_offset(vv, two.begin + 1), CLUSTER)  # same file: fd kept
        assert len(rec.calls) == 1 and vv.current_path == two_path

        assert vv.read(cluster_offset(vv, one.begin), 4) == b"one\n"
        vv.read(cluster_offset(vv, 0), SECTOR)  # a directory cluster closes the file
        assert vv.current_path is None
        vv.read(cluster_offset(vv, one.begin), SECTOR)
    assert rec.events == [
        ("open", two_path),
        ("open", one_path),  # the new file is opened before the old one is closed
        ("close", two_path),
        ("close", one_path),  # by the directory read
        ("open", one_path),
        ("close", one_path),  # by close()
    ]


def test_refused_open_reads_zeros_and_retries_per_sector(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    rec = Recorder(refuse={str(tree / "one.txt")})
    with VVFat(parse_fat_filename(f"fat:16:{tree}"), qemu_open=rec) as vv:
        one = mapping(vv, "one.txt")
        assert vv.read(cluster_offset(vv, one.begin), 4 * SECTOR) == bytes(4 * SECTOR)
        assert rec.paths() == [str(tree / "one.txt")] * 4


def test_stale_cluster_buffer_tail(tmp_path: Path) -> None:
    """A file's last cluster shows the previous file read past its end, as in QEMU."""
    tree = make_tree(tmp_path)
    with VVFat(parse_fat_filename(f"fat:16:{tree}"), qemu_open=Recorder()) as vv:
        two, one = mapping(vv, "two.bin"), mapping(vv, "one.txt")
        before = vv.read(cluster_offset(vv, two.begin), CLUSTER)
        data = vv.read(cluster_offset(vv, one.begin), CLUSTER)
        assert data[:4] == b"one\n" and data[4:] == before[4:]


# -- write mode ---------------------------------------------------------------


@pytest.fixture
def rw_disk(tmp_path: Path) -> Iterator[tuple[VVFat, Recorder, Path]]:
    tree = make_tree(tmp_path)
    made: list[str] = []

    def make_temp() -> tuple[int, str]:
        path = str(tmp_path / f"vl.{len(made)}")
        made.append(path)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), path

    rec = Recorder()
    vv = VVFat(parse_fat_filename(f"fat:rw:{tree}"), qemu_open=rec, make_temp=make_temp)
    assert len(made) == 1 and not os.path.exists(made[0]), "the write target is unlinked"
    yield vv, rec, tree
    vv.close()


def test_rw_write_target_opens(rw_disk: tuple[VVFat, Recorder, Path], tmp_path: Path) -> None:
    _, rec, _ = rw_disk
    probe = os.O_RDONLY | os.O_NONBLOCK
    target = str(tmp_path / "vl.0")
    assert rec.calls == [
        (target, probe, 0),
        (target, os.O_RDWR | os.O_CREAT, 0o644),
        (target, probe, 0),
        (target, os.O_RDWR, 0),
        (target, probe, 0),
        (target, os.O_RDWR, 0),
    ]


def test_rw_writes_read_back(rw_disk: tuple[VVFat, Recorder, Path]) -> None:
    vv, _, tree = rw_disk
    two = mapping(vv, "two.bin")
    off = cluster_offset(vv, two.begin) + 3 * SECTOR
    original = vv.read(off - SECTOR, 3 * SECTOR)
    vv.write(off + 10, b"written!")
    got = vv.read(off - SECTOR, 3 * SECTOR)
    expected = bytearray(original)
    expected[SECTOR + 10 : SECTOR + 18] = b"written!"
    assert got == bytes(expected)
    assert (tree / "two.bin").read_bytes()[3 * SECTOR + 10 : 3 * SECTOR + 18] != b"written!"


def test_rw_bootsector_only_dirty_byte(rw_disk: tuple[VVFat, Recorder, Path]) -> None:
    vv, _, _ = rw_disk
    boot = vv.layout.geometry.offset_to_bootsector * SECTOR
    sector = bytearray(vv.read(boot, SECTOR))
    sector[37] = 1
    vv.write(boot, bytes(sector))
    assert vv.read(boot, SECTOR) == bytes(sector)
    sector[3] ^= 0xFF
    with pytest.raises(BlockError, match="protected bootsector"):
        vv.write(boot, bytes(sector))
    with pytest.raises(BlockError, match="before the FAT"):
        vv.write(0, bytes(SECTOR))


def test_rw_read_only_host_file(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    (tree / "one.txt").chmod(0o444)
    with VVFat(parse_fat_filename(f"fat:rw:{tree}"), qemu_open=Recorder()) as vv:
        off = cluster_offset(vv, mapping(vv, "one.txt").begin)
        with pytest.raises(BlockError, match="write-protected file"):
            vv.write(off, bytes(SECTOR))


def test_write_needs_rw(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    with VVFat(parse_fat_filename(f"fat:{tree}"), qemu_open=Recorder()) as vv:
        with pytest.raises(BlockError, match="read-only"):
            vv.write(cluster_offset(vv, 2), bytes(SECTOR))
        with pytest.raises(BlockError, match="outside the disk"):
            vv.read(vv.virtual_size - SECTOR, 2 * SECTOR)


def test_model_through_broker(tmp_path: Path, make_pair: type) -> None:
    from testbed.broker import Policy

    tree = make_tree(tmp_path)
    pair = make_pair(Policy.from_grants(ro=[tree], directories=True))
    with VVFat(parse_fat_filename(f"fat:16:{tree}"), qemu_open=pair.client.open) as vv:
        one = mapping(vv, "one.txt")
        assert vv.read(cluster_offset(vv, one.begin), 4) == b"one\n"
    records = pair.broker.records
    assert [(r.path, r.flags, r.result) for r in records] == [
        (str(tree), DIRECTORY_FLAGS, 0),
        (str(tree / "sub"), DIRECTORY_FLAGS, 0),
        (str(tree / "one.txt"), 0, 0),
    ]


def test_model_scan_refused_without_a_directories_rule(tmp_path: Path, make_pair: type) -> None:
    from testbed.broker import Policy

    tree = make_tree(tmp_path)
    pair = make_pair(Policy.from_grants(ro=[tree]))
    with pytest.raises(BlockError, match=r"could not read directory.*Permission denied"):
        VVFat(parse_fat_filename(f"fat:16:{tree}"), qemu_open=pair.client.open)


# -- against QEMU ---------------------------------------------------------------


REPO = Path(__file__).resolve().parents[2]


def _load_recipes() -> list[dict[str, object]]:
    """The vvfat recipes (TOML only, at collection time)."""
    with (REPO / "images" / "manifest.d" / "vvfat.toml").open("rb") as f:
        return list(tomllib.load(f)["image"])


def vvfat_recipes() -> list[object]:
    return [pytest.param(r, id=str(r["name"])) for r in _load_recipes()]


@pytest.fixture(scope="module")
def vvfat_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The vvfat trees built fresh by images/generate.py (a few seconds)."""
    require(shutil.which("qemu-img") is not None, "qemu-img (apt-get install qemu-utils)")
    require(shutil.which("qemu-io") is not None, "qemu-io (apt-get install qemu-utils)")
    out = tmp_path_factory.mktemp("vvfat-images")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "images" / "generate.py"),
            "--out",
            str(out),
            "--only",
            "vvfat*",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"building the vvfat trees failed:\n{proc.stdout}{proc.stderr}"
    return out


def qemu_name(images: Path, recipe: dict[str, object]) -> tuple[str, Path]:
    """QEMU's file name of a recipe's tree ("fat:16:/abs/tree") and the tree."""
    tree = images / str(recipe["name"]) / str(recipe["main"])
    return f"{recipe['subformat']}{tree}", tree


def assert_disk_equals_qemu(qemu_filename: str, options: VVFatOptions, out: Path) -> Recorder:
    """Convert with qemu-img, read the whole disk with the model, compare; the model's opens."""
    proc = subprocess.run(
        ["qemu-img", "convert", "-O", "raw", qemu_filename, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rec = Recorder()
    with VVFat(options, qemu_open=rec) as vv, out.open("rb") as f:
        assert out.stat().st_size == vv.virtual_size
        for pos in range(0, vv.virtual_size, CHUNK):
            ours = vv.read(pos, min(CHUNK, vv.virtual_size - pos))
            theirs = f.read(len(ours))
            if ours != theirs:
                at = next(
                    i
                    for i in range(0, len(ours), SECTOR)
                    if ours[i : i + SECTOR] != theirs[i : i + SECTOR]
                )
                pytest.fail(
                    f"{qemu_filename}: sector {(pos + at) // SECTOR} differs\n"
                    f"model {ours[at : at + 64].hex()}\nqemu  {theirs[at : at + 64].hex()}"
                )
    files = [m.path for m in vv.layout.mappings if not m.is_directory]
    assert sorted(set(rec.paths())) == sorted(files), "every non-empty file read, nothing else"
    assert {flags for _, flags, _ in rec.calls} == {HOST_FILE_FLAGS}
    return rec


@pytest.mark.images
@pytest.mark.parametrize("recipe", vvfat_recipes())
def test_disk_bytes_equal_qemu(
    vvfat_images: Path, recipe: dict[str, object], tmp_path: Path
) -> None:
    filename, _ = qemu_name(vvfat_images, recipe)
    assert_disk_equals_qemu(filename, parse_fat_filename(filename), tmp_path / "qemu.raw")


@pytest.mark.images
def test_json_options_label_and_floppy_fat16(vvfat_images: Path, tmp_path: Path) -> None:
    """The options only json: can give (label), on a 2.88 MB FAT16 floppy."""
    tree = vvfat_images / "vvfat-floppy" / "tree"
    options = VVFatOptions(dirname=str(tree), fat_type=16, floppy=True, label="MY DISK")
    qemu = json.dumps(
        {"driver": "vvfat", "dir": str(tree), "fat-type": 16, "floppy": True, "label": "MY DISK"}
    )
    assert_disk_equals_qemu(f"json:{qemu}", options, tmp_path / "qemu.raw")


_OPENAT = re.compile(
    r'openat\(AT_FDCWD, "(?P<path>[^"]*)", (?P<flags>[A-Z_|]+)(?:, \d+)?\) = (?P<fd>-?\d+)'
)
_CLOSE = re.compile(r"close\((?P<fd>\d+)\)\s+= 0")


def strace_host_events(log: str, tree: Path) -> list[tuple[str, str]]:
    """``("open"|"close", path relative to the tree)`` for host files (not directories)."""
    events: list[tuple[str, str]] = []
    open_fds: dict[str, str] = {}
    for line in log.splitlines():
        if m := _OPENAT.search(line):
            # strace prints non-ASCII bytes as C octal escapes.
            raw = codecs.escape_decode(m["path"].encode())[0]
            path, flags, fd = os.fsdecode(raw), m["flags"], m["fd"]
            if path.startswith(f"{tree}/") and "O_DIRECTORY" not in flags and int(fd) >= 0:
                assert set(flags.split("|")) == {"O_RDONLY", "O_CLOEXEC"}, line
                rel = os.path.relpath(path, tree)
                events.append(("open", rel))
                open_fds[fd] = rel
        elif (m := _CLOSE.search(line)) and m["fd"] in open_fds:
            events.append(("close", open_fds.pop(m["fd"])))
    return events


@pytest.mark.images
@pytest.mark.parametrize("recipe", vvfat_recipes())
def test_open_order_equals_strace(
    vvfat_images: Path, recipe: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require(shutil.which("strace") is not None, "strace (apt-get install strace)")
    filename, tree = qemu_name(vvfat_images, recipe)
    with VVFat(parse_fat_filename(filename), qemu_open=Recorder()) as probe:
        files = [m for m in probe.layout.mappings if not m.is_directory]
        dirs = [m for m in probe.layout.mappings if m.is_directory]
        offset = probe.layout.offset_to_root_dir
    # Cluster reads that exercise every rule: same file twice, another file,
    # a directory in between, back to a file, files in reverse order.
    plan: list[tuple[int, int]] = []

    def at(cluster: int) -> int:
        return (offset + SECTORS_PER_CLUSTER * cluster) * SECTOR

    plan.append((at(files[0].begin), SECTOR))
    plan.append((at(files[0].end - 1), 2 * SECTOR))
    plan.append((at(files[1].begin), CLUSTER))
    plan.append((at(dirs[-1].begin), SECTOR))
    plan.append((at(files[1].begin), SECTOR))
    plan += [(at(m.begin), SECTOR) for m in reversed(files)]
    plan.append((0, 1 << 20))

    log = tmp_path / "strace.log"
    argv = ["strace", "-f", "-e", "trace=openat,close", "-o", str(log), "qemu-io", "-r"]
    for off, length in plan:
        argv += ["-c", f"read -q {off} {length}"]
    proc = subprocess.run([*argv, filename], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = strace_host_events(log.read_text(), tree)

    rec = Recorder()
    with watch_closes(monkeypatch, rec), VVFat(parse_fat_filename(filename), qemu_open=rec) as vv:
        for off, length in plan:
            vv.read(off, length)
    events = [(kind, os.path.relpath(path, tree)) for kind, path in rec.events]
    assert events == expected
    assert sum(kind == "open" for kind, _ in events) > len(files), "the plan reopens a file"
