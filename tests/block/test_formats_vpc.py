"""The vpc (VHD) driver: recipes against qemu-img, corrupt images, size rules, fuzzing."""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.block.formats.vpc import (
    CHECKSUM_OFFSET,
    FOOTER_SIZE,
    VhdFooter,
    VpcDriver,
    vpc_checksum,
)
from testbed.errors import CorruptImageError
from testbed.pytest_plugin import require


def test_probe_wants_the_cookie() -> None:
    assert VpcDriver.probe(b"conectix" + bytes(504), "x.vhd") == 100
    assert VpcDriver.probe(b"conectiX", "x.vhd") == 0
    assert VpcDriver.probe(b"", "x.vhd") == 0


def _footer(*, creator: bytes, cyls: int, heads: int, secs: int, current_size: int) -> bytes:
    raw = bytearray(FOOTER_SIZE)
    struct.pack_into(
        ">8sIIQI4sI4sQQHBBII",
        raw,
        0,
        b"conectix",
        2,
        0x10000,
        0xFFFFFFFFFFFFFFFF,
        0,
        creator,
        0,
        b"Wi2k",
        current_size,
        current_size,
        cyls,
        heads,
        secs,
        2,
        0,
    )
    struct.pack_into(">I", raw, CHECKSUM_OFFSET, vpc_checksum(bytes(raw)))
    return bytes(raw)


@pytest.mark.parametrize(
    ("creator", "cyls", "heads", "secs", "expected_sectors"),
    [
        (b"qemu", 100, 4, 17, 100 * 4 * 17),  # QEMU (old): CHS
        (b"vpc ", 100, 4, 17, 100 * 4 * 17),  # Virtual PC: CHS
        (b"qem2", 100, 4, 17, 8000),  # QEMU force_size: current_size
        (b"win ", 100, 4, 17, 8000),  # Hyper-V: current_size
        (b"tap\0", 100, 4, 17, 8000),  # XenServer: current_size
        (b"qemu", 65535, 16, 255, 8000),  # maximum geometry: current_size
    ],
)
def test_size_follows_vpc_open_rules(
    creator: bytes, cyls: int, heads: int, secs: int, expected_sectors: int
) -> None:
    footer = VhdFooter.parse(
        _footer(creator=creator, cyls=cyls, heads=heads, secs=secs, current_size=8000 * 512), 0
    )
    assert footer.total_sectors() == expected_sectors


def test_checksum_mismatch_names_both_values() -> None:
    raw = bytearray(_footer(creator=b"qemu", cyls=1, heads=1, secs=1, current_size=512))
    raw[40] ^= 0xFF
    with pytest.raises(CorruptImageError, match="does not match the computed") as caught:
        VhdFooter.parse(bytes(raw), 4096)
    assert (caught.value.field, caught.value.offset) == ("checksum", 4096 + CHECKSUM_OFFSET)


@pytest.fixture(scope="module")
def sample_images(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    require(shutil.which("qemu-img") is not None, "qemu-img (apt-get install qemu-utils)")
    d = tmp_path_factory.mktemp("vpc-sample")
    out = []
    for sub in ("dynamic", "fixed"):
        path = d / f"{sub}.vhd"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "vpc", "-o", f"subformat={sub}", str(path), "1M"],
            check=True,
        )
        subprocess.run(
            ["qemu-io", "-f", "vpc", "-c", "write -q -P 0x77 0 4k", str(path)], check=True
        )
        out.append(Path(path).read_bytes())
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2048))
def test_fuzz_random_bytes(fuzz_open: Callable[[str, bytes], None], data: bytes) -> None:
    fuzz_open("vpc", data)
    fuzz_open("vpc", b"conectix" + data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.integers(0, 1),
    edits=st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), min_size=1, max_size=8),
    from_end=st.booleans(),
    cut=st.one_of(st.none(), st.integers(0, 1 << 21)),
)
def test_fuzz_mutated_real_image(
    fuzz_open: Callable[[str, bytes], None],
    sample_images: list[bytes],
    which: int,
    edits: list[tuple[int, int]],
    from_end: bool,
    cut: int | None,
) -> None:
    data = bytearray(sample_images[which])
    for offset, value in edits:
        pos = len(data) - 1 - offset if from_end else offset
        if 0 <= pos < len(data):
            data[pos] = value
    # Fix the footer checksum half of the time so mutations get past it.
    if edits[0][1] % 2:
        start = 0 if data[:8] == b"conectix" else len(data) - FOOTER_SIZE
        if start >= 0:
            data[start + CHECKSUM_OFFSET : start + CHECKSUM_OFFSET + 4] = bytes(4)
            total = vpc_checksum(bytes(data[start : start + FOOTER_SIZE]))
            data[start + CHECKSUM_OFFSET : start + CHECKSUM_OFFSET + 4] = struct.pack(">I", total)
    fuzz_open("vpc", bytes(data[:cut]))
