"""The record format and scanner, host side only (no QEMU)."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.errors import CorruptImageError
from testbed.guest.records import (
    SECTOR,
    DiskLayout,
    SnapshotMark,
    VerifyError,
    encode_record,
    parse_record,
    pattern_bytes,
    pattern_digest,
    scan,
    verify_chain,
)
from testbed.pytest_plugin import require

LAYOUT = DiskLayout(size=1024 * 1024, pattern_sectors=16, record_start=32)
FILL = "ab" * 180


def disk_with(records: dict[int, bytes], layout: DiskLayout = LAYOUT) -> bytearray:
    data = bytearray(layout.size)
    for sector, block in records.items():
        data[sector * SECTOR : (sector + 1) * SECTOR] = block
    return data


def test_record_round_trip() -> None:
    block = encode_record(7, "run1", FILL)
    assert len(block) == SECTOR
    rec = parse_record(block, sector=39)
    assert rec is not None
    assert (rec.seq, rec.run, rec.sector) == (7, "run1", 39)


def test_record_matches_the_guest_script_format() -> None:
    # What tb.sh writes: body, a space, sha256(body) in hex, newline, NUL padding.
    body = b"TBREC1 0000000003 r " + b"0f" * 10
    line = body + b" " + hashlib.sha256(body).hexdigest().encode() + b"\n"
    assert encode_record(3, "r", "0f" * 10) == line.ljust(SECTOR, b"\0")


def test_empty_block_is_no_record() -> None:
    assert parse_record(bytes(SECTOR), sector=0) is None


def test_flipped_byte_is_corrupt() -> None:
    block = bytearray(encode_record(1, "r", FILL))
    block[30] ^= 0x01
    with pytest.raises(CorruptImageError, match=r"checksum|malformed"):
        parse_record(bytes(block), sector=5)


def test_torn_record_is_corrupt() -> None:
    block = encode_record(1, "r", FILL)
    torn = block[:200] + bytes(SECTOR - 200)
    with pytest.raises(CorruptImageError, match="offset 0xa00"):
        parse_record(torn, sector=5)


@given(st.binary(min_size=SECTOR - 7, max_size=SECTOR - 7))
def test_random_block_with_magic_never_crashes(tail: bytes) -> None:
    with contextlib.suppress(CorruptImageError):
        parse_record(b"TBREC1 " + tail, sector=0)


def test_scan_finds_records_and_ignores_other_runs() -> None:
    s = LAYOUT.record_start
    data = disk_with(
        {
            s + 0: encode_record(0, "me", FILL),
            s + 2: encode_record(2, "me", FILL),
            s + 3: encode_record(3, "other", FILL),
        }
    )
    result = scan(bytes(data), LAYOUT, "me")
    assert result.seqs == {0, 2}
    assert result.corrupt == ()


def test_scan_reports_misplaced_record() -> None:
    data = disk_with({LAYOUT.record_start + 5: encode_record(4, "me", FILL)})
    result = scan(bytes(data), LAYOUT, "me")
    assert result.seqs == set()
    assert result.corrupt and "record 4 in sector" in result.corrupt[0][1]


def test_pattern_is_deterministic_and_run_specific() -> None:
    assert pattern_bytes("a", 100) == pattern_bytes("a", 100)
    assert pattern_bytes("a", 100) != pattern_bytes("b", 100)
    assert len(pattern_bytes("a", 1000)) == 1000
    want = hashlib.sha256(pattern_bytes("a", 16 * SECTOR)).hexdigest()
    assert pattern_digest("a", LAYOUT) == want


def test_layout_rejects_overlap() -> None:
    with pytest.raises(ValueError, match="overlap"):
        DiskLayout(size=1024 * 1024, pattern_sectors=64, record_start=32)


def write_record(path: Path, fmt: str, seq: int, run: str) -> None:
    # qemu-io writes arbitrary bytes only from a file (write -s)
    block = encode_record(seq, run, FILL)
    scratch = path.parent / f"rec{seq}.bin"
    scratch.write_bytes(block)
    offset = (LAYOUT.record_start + seq) * SECTOR
    subprocess.run(
        ["qemu-io", "-f", fmt, "-c", f"write -s {scratch} {offset} {SECTOR}", str(path)],
        check=True,
        capture_output=True,
    )


@pytest.mark.images
def test_verify_chain_accepts_a_good_chain_and_catches_loss(tmp_path: Path) -> None:
    require(shutil.which("qemu-img") is not None, "qemu-img (qemu-utils)")
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(LAYOUT.size))
    for seq in (0, 1, 2):
        write_record(base, "raw", seq, "r")
    s1 = tmp_path / "s1.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(s1)],
        check=True,
    )
    for seq in (3, 4):
        write_record(s1, "qcow2", seq, "r")
    mark = SnapshotMark(overlay=s1, synced_before=2, synced_after=2)
    report = verify_chain(
        base=base, base_format="raw", marks=[mark], synced=range(5), layout=LAYOUT, run="r"
    )
    assert report.records_found == 5
    assert dict(report.per_layer) == {"base.raw": 3, "s1.qcow2": 5}

    # seq 5 was reported synced but never written: lost
    with pytest.raises(VerifyError, match=r"missing from the chain: \[5\]"):
        verify_chain(
            base=base, base_format="raw", marks=[mark], synced=range(6), layout=LAYOUT, run="r"
        )
    # claiming seq 3 was synced before the snapshot: it is not in the older file
    early = SnapshotMark(overlay=s1, synced_before=3, synced_after=3)
    want = r"base.raw: records synced before snapshot 1 missing: \[3\]"
    with pytest.raises(VerifyError, match=want):
        verify_chain(
            base=base, base_format="raw", marks=[early], synced=range(5), layout=LAYOUT, run="r"
        )
    # a record that reached the base after the snapshot returned
    write_record(base, "raw", 9, "r")
    with pytest.raises(VerifyError, match=r"written after snapshot 1: \[9\]"):
        verify_chain(
            base=base, base_format="raw", marks=[mark], synced=range(5), layout=LAYOUT, run="r"
        )
