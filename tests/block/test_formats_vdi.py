"""The vdi driver: recipes against qemu-img, corrupt images, header checks, fuzzing."""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.block.formats.vdi import SIGNATURE, VdiDriver, VdiHeader
from testbed.errors import CorruptImageError
from testbed.pytest_plugin import require


def test_probe_wants_a_whole_header_with_the_signature() -> None:
    header = bytes(64) + struct.pack("<I", SIGNATURE) + bytes(444)
    assert VdiDriver.probe(header, "x.vdi") == 100
    assert VdiDriver.probe(header[:511], "x.vdi") == 0
    assert VdiDriver.probe(bytes(512), "x.vdi") == 0


@pytest.fixture(scope="module")
def sample_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    require(shutil.which("qemu-img") is not None, "qemu-img (apt-get install qemu-utils)")
    path = tmp_path_factory.mktemp("vdi-sample") / "s.vdi"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vdi", str(path), "3M"], check=True)
    subprocess.run(["qemu-io", "-f", "vdi", "-c", "write -q -P 0x66 1M 4k", str(path)], check=True)
    return path.read_bytes()


@pytest.mark.parametrize(
    ("offset", "value", "field", "message"),
    [
        (68, struct.pack("<I", 0x00020000), "version", "unsupported version 2.0"),
        (340, struct.pack("<I", 513), "offset_bmap", "0x201"),
        (360, struct.pack("<I", 4096), "sector_size", "sector size 4096"),
        (376, struct.pack("<I", 2 << 20), "block_size", "block size 2097152"),
        (384, struct.pack("<I", 1), "blocks_in_image", "does not fit in 1 blocks"),
        (440, b"\x01", "uuid_parent", "parent UUID"),
        (368, struct.pack("<Q", 1 << 62), "disk_size", "above the VDI maximum"),
    ],
)
def test_bad_header_field_is_named(
    sample_image: bytes, offset: int, value: bytes, field: str, message: str
) -> None:
    data = bytearray(sample_image)
    data[offset : offset + len(value)] = value
    with pytest.raises(CorruptImageError, match=message) as caught:
        VdiHeader.parse(bytes(data))
    assert caught.value.field == field


def test_discarded_block_reads_as_zeros(sample_image: bytes, open_bytes: Any) -> None:
    data = bytearray(sample_image)
    (bmap,) = struct.unpack_from("<I", data, 340)
    struct.pack_into("<I", data, bmap + 4, 0xFFFFFFFE)

    def zeros(offset: int, length: int) -> bytes:
        return bytes(length)

    before = open_bytes("vdi", sample_image).read(1 << 20, 4096, zeros)
    assert before == b"\x66" * 4096
    image = open_bytes("vdi", bytes(data))
    assert image.read(1 << 20, 4096, zeros) == bytes(4096)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=1024))
def test_fuzz_random_bytes(fuzz_open: Callable[[str, bytes], None], data: bytes) -> None:
    fuzz_open("vdi", data)
    fuzz_open("vdi", bytes(64) + struct.pack("<II", SIGNATURE, 0x00010001) + data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(st.tuples(st.integers(0, 2048), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 3 << 20)),
)
def test_fuzz_mutated_real_image(
    fuzz_open: Callable[[str, bytes], None],
    sample_image: bytes,
    edits: list[tuple[int, int]],
    cut: int | None,
) -> None:
    data = bytearray(sample_image)
    for offset, value in edits:
        data[offset] = value
    fuzz_open("vdi", bytes(data[:cut]))
