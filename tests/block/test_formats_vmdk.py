"""The vmdk driver against QEMU 7.2 (qemu-img, strace) and against garbage.

Image tests build the ``vmdk*`` recipes of images/manifest.d/vmdk.toml,
open each with the driver through FdFile + LocalOpenContext, check the
extent opens against the order strace shows qemu-img opening them, and
compare every guest byte with ``qemu-img convert -O raw``.  Parser tests
feed bytes in and check what comes out; hypothesis throws garbage at the
header and descriptor parsers and at a whole small image, where only
CorruptImageError (or OSError for a refused extent open) may escape.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tomllib
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.block.driver import (
    BackingReader,
    BlockFile,
    ChildSpec,
    FdFile,
    LocalOpenContext,
    MemFile,
    zeros_backing,
)
from testbed.block.formats.vmdk import VmdkDriver, VmdkImage
from testbed.block.formats.vmdk_descriptor import (
    iter_extent_lines,
    parse_cid,
    parse_create_type,
    parse_extent_lines,
    parse_parent_hint,
    probe_text,
)
from testbed.block.formats.vmdk_layout import (
    FOOTER_SIZE,
    parse_cowd_header,
    parse_footer,
    parse_vmdk4_header,
)
from testbed.errors import CorruptImageError
from testbed.pytest_plugin import require

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "images" / "manifest.d" / "vmdk.toml"
IMAGES = ROOT / "build" / "images"
CHUNK = 1 << 20

#: The field each corrupt recipe must be reported under.
CORRUPT_FIELDS = {
    "vmdk-corrupt-bad-magic": "createType",
    "vmdk-corrupt-truncated": "grain_offset",
    "vmdk-corrupt-gd-past-eof": "gd_offset",
    "vmdk-corrupt-bad-line": "extent line",
    "vmdk-corrupt-extent-loop": "desc_offset",
    "vmdk-corrupt-huge-grain-table": "num_gtes_per_gt",
    "vmdk-corrupt-huge-grain": "granularity",
    "vmdk-corrupt-huge-capacity": "grain directory size",
}


def _recipes() -> list[dict[str, Any]]:
    with MANIFEST.open("rb") as f:
        return list(tomllib.load(f)["image"])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "good_recipe" in metafunc.fixturenames:
        good = [r for r in _recipes() if not r.get("corrupt")]
        metafunc.parametrize(
            "good_recipe",
            [
                pytest.param(
                    r,
                    id=r["name"],
                    marks=[pytest.mark.slow] if "large-virtual-size" in r.get("tags", []) else [],
                )
                for r in good
            ],
        )
    if "corrupt_recipe" in metafunc.fixturenames:
        bad = [r for r in _recipes() if r.get("corrupt")]
        metafunc.parametrize("corrupt_recipe", [pytest.param(r, id=r["name"]) for r in bad])


@pytest.fixture(scope="module")
def built_images() -> Path:
    """Build (or reuse) the vmdk recipes under build/images."""
    require(shutil.which("qemu-img") is not None, "qemu-img (apt-get install qemu-utils)")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "images" / "generate.py"), "--out", str(IMAGES), "--only",
         "vmdk*"],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"images/generate.py failed:\n{proc.stdout}{proc.stderr}"
    return IMAGES


def _main(images: Path, recipe: dict[str, Any]) -> Path:
    path = images / str(recipe["name"]) / str(recipe["main"])
    require(path.exists(), f"image {path} (python3 images/generate.py --only 'vmdk*')")
    return path


class _Opened:
    """A vmdk opened with plain fds, closed on exit."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.ctx = LocalOpenContext()
        self.file = FdFile(self.fd, str(path))

    def open(self) -> VmdkImage:
        return VmdkDriver.open(self.file, self.ctx)

    def __enter__(self) -> _Opened:
        return self

    def __exit__(self, *exc: object) -> None:
        self.ctx.close()
        os.close(self.fd)


def _backing_chain(image: VmdkImage, path: Path, stack: list[_Opened]) -> BackingReader:
    """A small stand-in for the core: open the parentFileNameHint chain as vmdk."""
    if image.backing_filename is None:
        return zeros_backing
    assert image.backing_format == "vmdk"  # vmdk_parent_open hard-codes it
    parent_path = path.parent / image.backing_filename
    opened = _Opened(parent_path)
    stack.append(opened)
    parent = opened.open()
    below = _backing_chain(parent, parent_path, stack)

    def read(offset: int, length: int) -> bytes:
        # Past the end of a shorter parent the guest reads zeros.
        inside = max(0, min(length, parent.virtual_size - offset))
        data = parent.read(offset, inside, below) if inside else b""
        return data + bytes(length - inside)

    return read


def _qemu_extent_opens(path: Path, skip: set[str]) -> list[str]:
    """Basenames of the files qemu-img opened after the main file (probes left out)."""
    proc = subprocess.run(
        ["strace", "-f", "-e", "trace=openat", "qemu-img", "info", "-f", "vmdk", path.name],
        cwd=path.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = []
    for line in proc.stderr.splitlines():
        m = re.search(r'openat\(AT_FDCWD, "([^"]+)", (O_[A-Z_|]+)', line)
        if m and "O_NONBLOCK" not in m.group(2) and "/" not in m.group(1):
            names.append(m.group(1))
    assert names and names[0] == path.name, names
    return [n for n in names[1:] if n not in skip]


def _compare_with_qemu(
    image: VmdkImage, backing: BackingReader, path: Path, tmp_path: Path
) -> None:
    raw = tmp_path / "qemu.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "vmdk", "-O", "raw", str(path), str(raw)],
        check=True,
        timeout=300,
    )
    assert raw.stat().st_size == image.virtual_size
    zero = bytes(CHUNK)
    fd = os.open(raw, os.O_RDONLY)
    try:
        for offset in range(0, image.virtual_size, CHUNK):
            length = min(CHUNK, image.virtual_size - offset)
            ours = image.read(offset, length, backing)
            try:
                hole = os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
            except OSError:  # ENXIO: only a hole from here on
                hole = True
            # A hole in qemu-img's sparse output reads as zeros: skip reading it.
            theirs = zero[:length] if hole else os.pread(fd, length, offset)
            if ours != theirs:
                at = next(i for i in range(length) if ours[i] != theirs[i])
                pytest.fail(
                    f"{path}: byte {offset + at:#x} is {ours[at]:#04x} in the model, "
                    f"{theirs[at]:#04x} in qemu-img convert"
                )
    finally:
        os.close(fd)


@pytest.mark.images
def test_image_matches_qemu(
    built_images: Path, good_recipe: dict[str, Any], tmp_path: Path
) -> None:
    require(shutil.which("strace") is not None, "strace (apt-get install strace)")
    path = _main(built_images, good_recipe)
    parents: list[_Opened] = []
    with _Opened(path) as opened:
        try:
            image = opened.open()
            assert image.create_type == good_recipe["subformat"]
            # Every child the driver opened is an extent, in QEMU's order.
            assert {role for role, _ in opened.ctx.opened} <= {"extent"}
            ours = [os.path.basename(name) for _, name in opened.ctx.opened]
            skip = {image.backing_filename} if image.backing_filename else set()
            assert ours == _qemu_extent_opens(path, skip)
            backing = _backing_chain(image, path, parents)
            _compare_with_qemu(image, backing, path, tmp_path)
        finally:
            for parent in parents:
                parent.__exit__()


@pytest.mark.images
def test_chain_has_vmdk_backing(built_images: Path) -> None:
    path = _main(built_images, {"name": "vmdk-chain", "main": "child.vmdk"})
    with _Opened(path) as opened:
        image = opened.open()
        assert (image.backing_filename, image.backing_format) == ("parent.vmdk", "vmdk")
        assert image.parent_cid != 0xFFFFFFFF
        with _Opened(path.parent / "parent.vmdk") as parent_opened:
            parent = parent_opened.open()
            assert parent.cid == image.parent_cid

            def parent_reader(offset: int, length: int) -> bytes:
                return parent.read(offset, length, zeros_backing)

            # Zeroed grains (GTE 1) hide the parent's 0xaa; unallocated ones show it.
            assert image.read(3 << 20, 4096, parent_reader) == bytes(4096)
            assert image.read(0, 4096, parent_reader) == b"\xaa" * 4096
            assert image.read(3 << 20, 4096, zeros_backing) == bytes(4096)


@pytest.mark.images
def test_descriptor_quirks_open_order(built_images: Path) -> None:
    path = _main(built_images, {"name": "vmdk-descriptor-quirks", "main": "disk.vmdk"})
    with _Opened(path) as opened:
        image = opened.open()
        names = [os.path.basename(n) for _, n in opened.ctx.opened]
        assert names == ["a.raw", "a.raw", "b.raw", "c.raw"]
        assert image.virtual_size == 5 << 20
        assert [e.start for e in image.extents] == [0, 1 << 20, 2 << 20, 3 << 20]


@pytest.mark.images
def test_corrupt_image_is_refused(built_images: Path, corrupt_recipe: dict[str, Any]) -> None:
    path = _main(built_images, corrupt_recipe)
    with _Opened(path) as opened:
        if corrupt_recipe["name"] == "vmdk-corrupt-missing-extent":
            with pytest.raises(FileNotFoundError) as missing:
                opened.open()
            assert missing.value.filename.endswith("disk-flat.vmdk")
            return
        with pytest.raises(CorruptImageError) as err:
            opened.open()
        assert err.value.format == "vmdk"
        assert err.value.field == CORRUPT_FIELDS[corrupt_recipe["name"]], str(err.value)
        if corrupt_recipe["name"] == "vmdk-corrupt-extent-loop":
            # QEMU recurses until EMFILE; the model stops at the first repeat.
            assert len(opened.ctx.opened) == 1


@pytest.mark.images
def test_probe_scores_real_files(built_images: Path) -> None:
    for recipe in _recipes():
        if recipe.get("corrupt"):
            continue
        path = _main(built_images, recipe)
        head = path.read_bytes()[:2048]
        assert VmdkDriver.probe(head, str(path)) == 100, path
    raw = built_images / "vmdk-descriptor-quirks" / "a.raw"
    assert VmdkDriver.probe(raw.read_bytes()[:2048], str(raw)) == 0


# ---- pure parser tests ------------------------------------------------------

HEAD = b'# Disk DescriptorFile\nversion=1\nCID=1234abcd\nparentCID=ffffffff\ncreateType="vmfs"\n'


def _names(text: bytes) -> list[tuple[str, bytes, int, int]]:
    return [(s.type, s.filename, s.sectors, s.flat_offset) for s in parse_extent_lines(text)]


def test_extent_lines_follow_sscanf() -> None:
    text = (
        HEAD + b"\n"  # a blank line: sscanf reads the next line through it
        b'RW 100 FLAT "a" 3\n'
        b'RDONLY 100 FLAT "skipped" 0\n'
        b'NOACCESS 100 FLAT "skipped" 0\n'
        b"RW 100 ZERO\n"
        b'RW 0 FLAT "empty" 0\n'
        b'RW 100 BOGUS "unknown"\n'
        b'  RW 7 VMFS "v"\r\n'
        b'RW 9 SPARSE "s.vmdk"\n'
    )
    assert _names(text) == [
        ("FLAT", b"a", 100, 3),
        ("FLAT", b"a", 100, 3),
        ("VMFS", b"v", 7, 0),
        ("SPARSE", b"s.vmdk", 9, 0),
    ]


@pytest.mark.parametrize(
    "line",
    [
        b'RW 100 FLAT "a"\n',  # FLAT needs an offset
        b'RW 100 FLAT "a" -1\n',
        b'RW 100 VMFS "a" 0\n',  # VMFS must not have one
        b'RW 100 SPARSE "a" 0\n',
    ],
)
def test_invalid_extent_line(line: bytes) -> None:
    with pytest.raises(CorruptImageError) as err:
        parse_extent_lines(HEAD + line)
    assert err.value.field == "extent line"
    assert err.value.offset == len(HEAD)


def test_extents_before_a_bad_line_come_first() -> None:
    lines = iter_extent_lines(HEAD + b'RW 1 FLAT "a" 0\nRW 1 FLAT "b"\n')
    assert next(lines).filename == b"a"
    with pytest.raises(CorruptImageError):
        next(lines)


def test_text_stops_at_nul() -> None:
    assert _names(HEAD + b'RW 1 FLAT "a" 0\n\0RW 1 FLAT "b" 0\n') == [("FLAT", b"a", 1, 0)]


def test_create_type() -> None:
    assert parse_create_type(HEAD) == "vmfs"
    for text, why in [
        (b"version=1\n", "invalid VMDK image descriptor"),
        (b'createType="monolithicSparse"\n', "unsupported image type"),
        (b'createType="twoGbMaxExtentFlat', "invalid VMDK image descriptor"),
    ]:
        with pytest.raises(CorruptImageError, match=why):
            parse_create_type(text)


def test_parent_hint_and_cids() -> None:
    desc = HEAD + b'parentFileNameHint="../base.vmdk"\n'
    assert parse_parent_hint(desc, base=0) == "../base.vmdk"
    assert parse_parent_hint(HEAD, base=0) is None
    assert parse_parent_hint(b'parentFileNameHint=""\n', base=0) is None
    with pytest.raises(CorruptImageError) as err:
        parse_parent_hint(b'parentFileNameHint="unterminated\n', base=0x200)
    assert err.value.offset == 0x200
    assert parse_cid(HEAD, b"CID", base=0) == 0x1234ABCD
    assert parse_cid(HEAD, b"parentCID", base=0) == 0xFFFFFFFF
    with pytest.raises(CorruptImageError):
        parse_cid(b"version=1\n", b"CID", base=0)


@pytest.mark.parametrize(
    ("buf", "score"),
    [
        (b"KDMV", 100),
        (b"COWD\0\0", 100),
        (b"KDM", 0),
        (b"# Disk DescriptorFile\nversion=1\nCID=1\n", 100),
        (b"# c\n   \r\nversion=3\r\n", 100),
        (b"\nversion=1\n", 0),  # a blank line must start with a space
        (b"version=4\n", 0),
        (b"version=1", 0),
        (b"# only a comment", 0),
        (b"\0" * 2048, 0),
    ],
)
def test_probe(buf: bytes, score: int) -> None:
    assert VmdkDriver.probe(buf, "x") == score


# ---- an in-memory image for fuzzing -------------------------------------------


class NoOpenContext:
    """Refuses every child open, as a broker with no grants would."""

    read_only = True

    def open_file(self, filename: str, *, child: ChildSpec, relative_to: BlockFile) -> BlockFile:
        raise PermissionError(13, "refused", filename)


def small_sparse(*, compressed: bool = False) -> bytes:
    """A 256 KiB monolithicSparse (or stream-optimized) image with two grains."""
    grain = 16  # sectors
    desc = HEAD.replace(b'"vmfs"', b'"monolithicSparse"') + b'RW 512 SPARSE "mem.vmdk"\n'
    flags = 3 | ((1 << 16 | 1 << 17) if compressed else 0)
    header = b"KDMV" + struct.pack(
        "<IIQQQQIQQQc4sH", 1, flags, 512, grain, 1, 2, 16, 0, 3, 8, b"\0", b"\n \r\n",
        1 if compressed else 0,
    )  # fmt: skip
    image = bytearray(8 * 512)
    image[: len(header)] = header
    image[512 : 512 + len(desc)] = desc
    struct.pack_into("<I", image, 3 * 512, 4)  # directory entry 0 -> table at sector 4
    for index, byte in ((0, 0x11), (5, 0x22)):
        payload = bytes([byte]) * grain * 512
        struct.pack_into("<I", image, 4 * 512 + 4 * index, len(image) // 512)
        if compressed:
            packed = zlib.compress(payload)
            blob = struct.pack("<QI", index * grain, len(packed)) + packed
            image += blob.ljust(-(-len(blob) // 512) * 512, b"\0")
        else:
            image += payload
    return bytes(image)


@pytest.mark.parametrize("compressed", [False, True])
def test_small_sparse_reads(compressed: bool) -> None:
    image = VmdkDriver.open(MemFile(small_sparse(compressed=compressed)), NoOpenContext())
    assert image.virtual_size == 512 * 512
    assert image.create_type == ("streamOptimized" if compressed else "monolithicSparse")
    grain = 16 * 512
    assert image.read(0, grain, zeros_backing) == b"\x11" * grain
    assert image.read(grain, grain, lambda o, n: b"\x77" * n) == b"\x77" * grain
    assert image.read(5 * grain - 100, 200, zeros_backing) == bytes(100) + b"\x22" * 100


def test_stream_footer_is_followed() -> None:
    image = bytearray(small_sparse(compressed=True))
    header = bytes(image[:512])
    struct.pack_into("<Q", image, 56, 0xFFFF_FFFF_FFFF_FFFF)
    image += struct.pack("<QII", 1, 0, 3).ljust(512, b"\0") + header + bytes(512)
    opened = VmdkDriver.open(MemFile(bytes(image)), NoOpenContext())
    assert opened.read(0, 512, zeros_backing) == b"\x11" * 512
    with pytest.raises(CorruptImageError) as err:
        parse_footer(bytes(FOOTER_SIZE), base=4096)
    assert err.value.field == "footer" and err.value.offset == 4096


def _only_corrupt(call: Callable[[], object]) -> None:
    with contextlib.suppress(CorruptImageError):
        call()


@given(st.binary(max_size=200))
def test_fuzz_headers(buf: bytes) -> None:
    _only_corrupt(lambda: parse_vmdk4_header(buf))
    _only_corrupt(lambda: parse_vmdk4_header(b"KDMV" + buf))
    _only_corrupt(lambda: parse_cowd_header(b"COWD" + buf))
    _only_corrupt(lambda: parse_footer(buf.ljust(FOOTER_SIZE, b"\0")[:FOOTER_SIZE], base=0))


_TOKENS = [
    b"RW", b"RDONLY", b"ZERO", b"FLAT", b"SPARSE", b"VMFS", b"VMFSSPARSE", b"SESPARSE", b" ",
    b"\n", b"\r\n", b'"', b"0", b"-1", b"100", b"99999999999999999999", b"x.vmdk", b"\0",
    b"createType=", b'"monolithicFlat"', b"CID=", b"parentCID=", b"parentFileNameHint=",
    b"version=1\n", b"#", b"0x", b"\t",
]  # fmt: skip
descriptors = st.lists(st.sampled_from(_TOKENS) | st.binary(max_size=8), max_size=60).map(b"".join)


@given(descriptors)
def test_fuzz_descriptor(text: bytes) -> None:
    _only_corrupt(lambda: parse_extent_lines(text))
    _only_corrupt(lambda: parse_create_type(text))
    _only_corrupt(lambda: parse_parent_hint(text, base=0))
    _only_corrupt(lambda: parse_cid(text, b"CID", base=0))
    assert probe_text(text) in (0, 100)


def _mutations() -> st.SearchStrategy[bytes]:
    bases = [small_sparse(), small_sparse(compressed=True)]
    edits = st.lists(
        st.tuples(
            # mostly metadata (header, descriptor, tables), sometimes grains and markers
            st.integers(0, 4 * 512 + 64) | st.integers(0, len(bases[1])),
            st.binary(min_size=1, max_size=8),
        ),
        max_size=6,
    )

    def apply(base: bytes, changes: list[tuple[int, bytes]], cut: int | None) -> bytes:
        data = bytearray(base)
        for offset, blob in changes:
            data[offset : offset + len(blob)] = blob
        return bytes(data[:cut] if cut is not None else data)

    return st.builds(
        apply, st.sampled_from(bases), edits, st.none() | st.integers(0, len(bases[1]))
    )


def _open_and_read(data: bytes) -> Iterator[bytes]:
    image = VmdkDriver.open(MemFile(data), NoOpenContext())
    size = image.virtual_size
    yield image.read(0, min(size, 64 * 1024), zeros_backing)
    if size:
        tail = max(0, size - 8192)
        yield image.read(tail, size - tail, zeros_backing)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations())
def test_fuzz_whole_image(data: bytes) -> None:
    try:
        for _ in _open_and_read(data):
            pass
    except (CorruptImageError, PermissionError):
        pass
