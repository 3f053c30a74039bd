"""The qcow2 driver: every recipe against qemu-img, corrupt images, fuzzing, create and write."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.block.driver import FdFile, LocalOpenContext, zeros_backing
from testbed.block.formats.qcow2 import (
    MAGIC,
    Qcow2Driver,
    Qcow2Extensions,
    Qcow2Header,
    create_image,
)
from testbed.errors import BlockError, CorruptImageError
from testbed.pytest_plugin import require


@pytest.mark.images
def test_chain_reports_backing_names_and_formats(corpus: Any, chain: Any) -> None:
    image = corpus.by_name("qcow2-chain3-nofmt")
    chain.disk_hashes(image)
    seen = [
        (os.path.basename(path), img.backing_filename, img.backing_format)
        for path, img in chain.images
    ]
    assert seen == [
        ("top.qcow2", "l2.qcow2", None),
        ("l2.qcow2", "l1.qcow2", "qcow2"),
        ("l1.qcow2", "base.raw", "raw"),
        ("base.raw", None, None),
    ]


@pytest.mark.images
def test_data_file_is_opened_through_the_context(
    corpus: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = corpus.by_name("qcow2-data-file")
    monkeypatch.chdir(image.main.parent)  # the stored name is relative to the cwd
    ctx = LocalOpenContext()
    fd = os.open(image.main, os.O_RDONLY)
    try:
        Qcow2Driver.open(FdFile(fd, str(image.main)), ctx)
        assert ctx.opened == [("data-file", "disk.data")]
    finally:
        ctx.close()
        os.close(fd)


# -- probing and header parsing ---------------------------------------------------


def test_probe_wants_magic_version_and_a_whole_header() -> None:
    header = MAGIC + struct.pack(">I", 3) + bytes(104)
    assert Qcow2Driver.probe(header, "x") == 100
    assert Qcow2Driver.probe(header[:111], "x") == 0
    assert Qcow2Driver.probe(MAGIC + struct.pack(">I", 1) + bytes(104), "x") == 0
    assert Qcow2Driver.probe(b"QFI\xfa" + bytes(108), "x") == 0


def _fresh_image(tmp_path: Path, *args: str) -> bytes:
    require(shutil.which("qemu-img") is not None, "qemu-img (apt-get install qemu-utils)")
    path = tmp_path / "fresh.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *args, str(path), "4M"], check=True)
    return path.read_bytes()


def test_header_fields_of_a_qemu_img_image(tmp_path: Path) -> None:
    data = _fresh_image(tmp_path, "-u", "-b", "base.raw", "-F", "raw", "-o", "cluster_size=4096")
    header = Qcow2Header.parse(data)
    assert (header.version, header.cluster_bits, header.size) == (3, 12, 4 << 20)
    assert header.l1_size == 2 and header.refcount_order == 4
    assert header.header_length == 112
    ext = Qcow2Extensions.parse(data[:4096], header)
    assert ext.backing_format == "raw"
    assert ext.feature_names == ()  # QEMU leaves the table out for 4 KiB clusters


@pytest.mark.parametrize(
    ("offset", "value", "field", "message"),
    [
        (20, struct.pack(">I", 31), "cluster_bits", "unsupported cluster_bits 31"),
        (4, struct.pack(">I", 4), "version", "unsupported qcow2 version 4"),
        (100, struct.pack(">I", 96), "header_length", "below 104"),
        (96, struct.pack(">I", 7), "refcount_order", "refcount_order 7"),
        (36, struct.pack(">I", 1 << 30), "l1_table", "larger than"),
        (40, struct.pack(">Q", 0x1234), "l1_table_offset", "0x1234"),
        (56, struct.pack(">I", 0), "refcount_table_clusters", "no refcount table"),
        (32, struct.pack(">I", 1), "crypt_method", "encryption"),
        (72, struct.pack(">Q", 1 << 4), "incompatible_features", "extended L2"),
        (24, struct.pack(">Q", 1 << 50), "l1_size", "too small"),
    ],
)
def test_bad_header_field_is_named(
    tmp_path: Path, offset: int, value: bytes, field: str, message: str
) -> None:
    data = bytearray(_fresh_image(tmp_path))
    data[offset : offset + len(value)] = value
    with pytest.raises(CorruptImageError, match=message) as caught:
        Qcow2Header.parse(bytes(data))
    assert caught.value.field == field


def test_unknown_incompatible_feature_is_refused_by_name(tmp_path: Path, open_bytes: Any) -> None:
    data = bytearray(_fresh_image(tmp_path))
    data[72:80] = struct.pack(">Q", 1 << 63 | 1 << 5)
    # Name bit 5 in the feature table, as a newer QEMU would.
    table_at = 0x70 + 8  # the feature table is the first extension of a plain image
    assert data[0x70:0x74] == b"\x68\x03\xf8\x57"
    data[table_at : table_at + 48] = bytes([0, 5]) + b"future feature".ljust(46, b"\0")
    with pytest.raises(CorruptImageError, match=r"0x8000000000000020 \(future feature, bit 63\)"):
        open_bytes("qcow2", bytes(data))


@pytest.fixture(scope="module")
def sample_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small qcow2 v3 with a backing name, data and a compressed cluster, as bytes."""
    require(shutil.which("qemu-img") is not None, "qemu-img (apt-get install qemu-utils)")
    d = tmp_path_factory.mktemp("qcow2-sample")
    src = d / "src.raw"
    src.write_bytes(b"\x5a" * 65536 + os.urandom(65536) + bytes(65536 * 2))
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            str(src),
            str(d / "c.qcow2"),
        ],
        check=True,
    )
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-b", "base.raw", "-F", "raw", str(d / "c.qcow2")], check=True
    )
    return (d / "c.qcow2").read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600))
def test_fuzz_random_bytes(fuzz_open: Callable[[str, bytes], None], data: bytes) -> None:
    fuzz_open("qcow2", data)
    fuzz_open("qcow2", MAGIC + struct.pack(">I", 3) + data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 4096 * 6), st.integers(0, 255)), min_size=1, max_size=8
    ),
    cut=st.one_of(st.none(), st.integers(0, 4096 * 8)),
)
def test_fuzz_mutated_real_image(
    fuzz_open: Callable[[str, bytes], None],
    sample_image: bytes,
    edits: list[tuple[int, int]],
    cut: int | None,
) -> None:
    data = bytearray(sample_image)
    for offset, value in edits:
        if offset < len(data):
            data[offset] = value
    fuzz_open("qcow2", bytes(data[:cut]))


# -- creating and writing -----------------------------------------------------------


def _qemu_img(*args: str) -> str:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"qemu-img {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536])
@pytest.mark.parametrize("backing", [True, False])
def test_create_image_matches_qemu_img_byte_for_byte(
    tmp_path: Path, cluster_size: int, backing: bool
) -> None:
    require(shutil.which("qemu-img") is not None, "qemu-img (apt-get install qemu-utils)")
    size = 6 << 20
    ours = tmp_path / "ours.qcow2"
    fd = os.open(ours, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        create_image(
            FdFile(fd, str(ours)),
            size=size,
            backing_file="base.raw" if backing else None,
            backing_format="raw" if backing else None,
            cluster_size=cluster_size,
        )
    finally:
        os.close(fd)
    args = ["create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}"]
    if backing:
        args += ["-u", "-b", "base.raw", "-F", "raw"]
    _qemu_img(*args, str(tmp_path / "theirs.qcow2"), str(size))
    assert ours.read_bytes() == (tmp_path / "theirs.qcow2").read_bytes()


def test_create_image_refuses_bad_arguments(tmp_path: Path) -> None:
    path = tmp_path / "x.qcow2"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        f = FdFile(fd, str(path))
        with pytest.raises(BlockError, match="cluster size 3000"):
            create_image(f, size=1 << 20, backing_file=None, backing_format=None, cluster_size=3000)
        with pytest.raises(BlockError, match="multiple of 512"):
            create_image(f, size=1000, backing_file=None, backing_format=None)
        with pytest.raises(BlockError, match="too long"):
            create_image(f, size=1 << 20, backing_file="b", backing_format="x" * 16)
        os.write(fd, b"junk")
        with pytest.raises(BlockError, match="not empty"):
            create_image(f, size=1 << 20, backing_file=None, backing_format=None)
    finally:
        os.close(fd)


@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_writes_into_created_overlay_keep_qemu_img_check_clean(
    tmp_path: Path, cluster_size: int
) -> None:
    require(shutil.which("qemu-img") is not None, "qemu-img (apt-get install qemu-utils)")
    size = 4 << 20
    base = tmp_path / "base" / "base.raw"
    base.parent.mkdir()
    base_bytes = bytes(range(256)) * (3 << 12)  # 3 MiB: shorter than the overlay
    base.write_bytes(base_bytes)
    top = tmp_path / "top.qcow2"
    fd = os.open(top, os.O_RDWR | os.O_CREAT, 0o644)
    expected = bytearray(base_bytes + bytes(size - len(base_bytes)))

    def backing(offset: int, length: int) -> bytes:
        return bytes(expected_base[offset : offset + length])

    expected_base = bytes(expected)
    writes = [
        (1000, b"\x11" * 5000),  # partial clusters: copy-on-write from the base
        (3 << 20, b"\x22" * 70000),  # across the base's end
        (1000 + 65536 * 20, b"\x33" * 100),
        (1000, b"\x44" * 10),  # rewrite of an allocated cluster, in place
        (size - 512, b"\x55" * 512),  # last sector
        (2 << 20, bytes(range(256)) * 1024),  # whole clusters
    ]
    try:
        create_image(
            FdFile(fd, str(top)),
            size=size,
            backing_file="base/base.raw",
            backing_format="raw",
            cluster_size=cluster_size,
        )
        image = Qcow2Driver.open(FdFile(fd, str(top)), LocalOpenContext(read_only=False))
        for offset, data in writes:
            image.write(offset, data, backing)
            expected[offset : offset + len(data)] = data
        assert image.read(0, size, backing) == bytes(expected)
    finally:
        os.close(fd)

    check = subprocess.run(
        ["qemu-img", "check", "--output=json", str(top)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    info = json.loads(_qemu_img("info", "--backing-chain", "--output=json", str(top)))
    assert [i["format"] for i in info] == ["qcow2", "raw"]
    assert info[0]["backing-filename"] == "base/base.raw"
    assert info[0]["backing-filename-format"] == "raw"
    _qemu_img("convert", "-O", "raw", str(top), str(tmp_path / "out.raw"))
    assert (tmp_path / "out.raw").read_bytes() == bytes(expected)


def test_writes_replace_compressed_and_zero_clusters(tmp_path: Path) -> None:
    require(shutil.which("qemu-img") is not None, "qemu-img (apt-get install qemu-utils)")
    require(shutil.which("qemu-io") is not None, "qemu-io (apt-get install qemu-utils)")
    src = tmp_path / "src.raw"
    content = bytearray(b"\x61" * (1 << 20) + b"\x62" * (1 << 20))
    src.write_bytes(bytes(content))
    path = tmp_path / "c.qcow2"
    _qemu_img("convert", "-c", "-O", "qcow2", str(src), str(path))
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -q -z 1M 128k", str(path)], check=True, timeout=60
    )
    content[1 << 20 : (1 << 20) + (128 << 10)] = bytes(128 << 10)
    fd = os.open(path, os.O_RDWR)
    try:
        image = Qcow2Driver.open(FdFile(fd, str(path)), LocalOpenContext(read_only=False))
        for offset, data in [(100, b"\x71" * 300), ((1 << 20) + 4096, b"\x72" * 9000)]:
            image.write(offset, data, zeros_backing)
            content[offset : offset + len(data)] = data
    finally:
        os.close(fd)
    check = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    _qemu_img("convert", "-O", "raw", str(path), str(tmp_path / "out.raw"))
    assert (tmp_path / "out.raw").read_bytes() == bytes(content)


def test_read_only_image_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "ro.qcow2"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        create_image(FdFile(fd, str(path)), size=1 << 20, backing_file=None, backing_format=None)
        image = Qcow2Driver.open(FdFile(fd, str(path)), LocalOpenContext(read_only=True))
        with pytest.raises(BlockError, match="read-only"):
            image.write(0, b"x", zeros_backing)
        with pytest.raises(BlockError, match="outside"):
            image.read((1 << 20) - 1, 2, zeros_backing)
    finally:
        os.close(fd)
