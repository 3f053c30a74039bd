"""The raw driver against qemu-img, and its place in the driver registry."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from testbed.block.driver import FdFile, LocalOpenContext
from testbed.block.formats import all_drivers, get_driver
from testbed.block.formats.raw import RawDriver
from testbed.errors import BlockError


def test_registry_names_the_drivers() -> None:
    drivers = all_drivers()
    for name in ("raw", "qcow2", "vpc", "vdi"):
        assert drivers[name].name == name
    assert get_driver("raw") is RawDriver


def test_registry_refuses_unknown_format() -> None:
    with pytest.raises(KeyError, match="'qcow3'"):
        get_driver("qcow3")


def test_raw_probe_is_the_lowest_positive_score() -> None:
    assert RawDriver.probe(b"QFI\xfb" + bytes(200), "x.qcow2") == 1
    assert RawDriver.probe(b"", "x") == 1


IMAGE_FORMAT = "raw"


@pytest.mark.images
def test_raw_image_reads_like_qemu_img(corpus: Any, chain: Any, recipe: dict[str, object]) -> None:
    image = corpus.image(recipe)
    assert chain.disk_hashes(image) == corpus.expected_chunks(image)


def test_raw_odd_size_rounds_up_to_sectors_and_writes_through(tmp_path: Path) -> None:
    path = tmp_path / "odd.raw"
    path.write_bytes(b"\x07" * 1000)
    fd = os.open(path, os.O_RDWR)
    try:
        image = RawDriver.open(FdFile(fd, str(path)), LocalOpenContext(read_only=False))
        assert image.virtual_size == 1024  # as qemu-img info says for a 1000-byte file
        assert image.read(990, 34, lambda o, n: bytes(n)) == b"\x07" * 10 + bytes(24)
        image.write(4, b"abc", lambda o, n: bytes(n))
        assert path.read_bytes()[:8] == b"\x07" * 4 + b"abc\x07"
        with pytest.raises(BlockError, match="outside"):
            image.read(1000, 100, lambda o, n: bytes(n))
    finally:
        os.close(fd)
