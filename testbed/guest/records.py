"""The guest's disk: where the pattern and the records live, and checking them.

Layout of the disk under test (all in 512-byte sectors)::

    0 .. pattern_sectors-1      a pattern the host writes before boot; the
                                guest reads it back and prints its sha256
    record_start + seq          one record per sequence number

A record is text so that busybox ``sh`` can make it (see ``tb.sh``)::

    TBREC1 <seq, 10 digits> <run> <fill, hex> <sha256 of everything before the space>\\n

padded with NULs to 512 bytes.  ``run`` names the boot, so records left by
an earlier run never count; ``fill`` is random so two runs' records differ.
Because each record sits at ``record_start + seq``, the host finds every
record by scanning the raw disk, and a record in the wrong sector is itself
an error.

Verification of a snapshot chain reads each layer as the guest would have
seen it at that point (the layer with its own backing chain), converted to
raw with ``qemu-img convert``.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.errors import CorruptImageError, GuestUsageError, TestbedError

# VerifyError lived here before it joined errors.py: old imports keep working.
from testbed.errors import VerifyError as VerifyError

SECTOR = 512
MAGIC = b"TBREC1 "
_RECORD_RE = re.compile(rb"TBREC1 (\d{10}) ([A-Za-z0-9_-]{1,32}) ([0-9a-f]+) ([0-9a-f]{64})\n\0*")


@dataclass(frozen=True, kw_only=True)
class DiskLayout:
    """Where things are on the disk under test."""

    size: int = 16 * 1024 * 1024
    pattern_sectors: int = 2048
    record_start: int = 4096

    def __post_init__(self) -> None:
        if self.size % SECTOR:
            raise GuestUsageError(f"disk size {self.size} is not a multiple of {SECTOR}")
        if self.record_start < self.pattern_sectors:
            raise GuestUsageError(
                f"records (sector {self.record_start}) would overlap the pattern "
                f"(sectors 0..{self.pattern_sectors - 1})"
            )
        if self.record_start >= self.sectors:
            raise GuestUsageError(f"record_start {self.record_start} is beyond the disk")

    @property
    def sectors(self) -> int:
        return self.size // SECTOR

    @property
    def max_records(self) -> int:
        return self.sectors - self.record_start


@dataclass(frozen=True, kw_only=True)
class Record:
    """One record as found on the disk."""

    seq: int
    run: str
    sector: int


@dataclass(frozen=True, kw_only=True)
class Scan:
    """What a scan of one raw disk view found, for one run."""

    records: dict[int, Record] = field(default_factory=dict)
    #: (sector, why) for sectors that start with the magic but do not verify
    corrupt: tuple[tuple[int, str], ...] = ()

    @property
    def seqs(self) -> set[int]:
        return set(self.records)


def pattern_bytes(run: str, length: int) -> bytes:
    """The deterministic pattern for ``run``: a SHA-256 counter stream."""
    out = bytearray()
    counter = 0
    seed = run.encode()
    while len(out) < length:
        out += hashlib.sha256(seed + counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:length])


def pattern_digest(run: str, layout: DiskLayout) -> str:
    """The sha256 the guest must print for the pattern area."""
    return hashlib.sha256(pattern_bytes(run, layout.pattern_sectors * SECTOR)).hexdigest()


def encode_record(seq: int, run: str, fill: str) -> bytes:
    """A record exactly as ``tb write`` makes it (for tests and host-side writers)."""
    body = f"TBREC1 {seq:010d} {run} {fill}".encode()
    line = body + b" " + hashlib.sha256(body).hexdigest().encode() + b"\n"
    if len(line) > SECTOR:
        raise GuestUsageError(f"record for seq {seq} is {len(line)} bytes, more than a sector")
    return line.ljust(SECTOR, b"\0")


def parse_record(block: bytes, *, sector: int) -> Record | None:
    """The record in ``block``, None if it holds none.

    Raises :class:`CorruptImageError` when the block starts with the magic but
    is not a whole, correct record.
    """
    if not block.startswith(MAGIC):
        return None
    offset = sector * SECTOR
    m = _RECORD_RE.fullmatch(block)
    if m is None:
        raise CorruptImageError(
            fmt="guest-record", field="record", offset=offset, message="malformed record"
        )
    body = block[: m.start(4) - 1]
    want = hashlib.sha256(body).hexdigest().encode()
    if m.group(4) != want:
        raise CorruptImageError(
            fmt="guest-record",
            field="checksum",
            offset=offset,
            message=f"checksum {m.group(4).decode()} != {want.decode()}",
        )
    return Record(seq=int(m.group(1)), run=m.group(2).decode(), sector=sector)


def scan(data: bytes, layout: DiskLayout, run: str) -> Scan:
    """Find every record of ``run`` in a raw view of the disk.

    Records of other runs are ignored; a record of this run in a sector other
    than ``record_start + seq`` counts as corrupt.
    """
    records: dict[int, Record] = {}
    corrupt: list[tuple[int, str]] = []
    end = min(len(data) // SECTOR, layout.sectors)
    for sector in range(layout.record_start, end):
        block = data[sector * SECTOR : (sector + 1) * SECTOR]
        try:
            rec = parse_record(block, sector=sector)
        except CorruptImageError as err:
            corrupt.append((sector, str(err)))
            continue
        if rec is None or rec.run != run:
            continue
        if rec.sector != layout.record_start + rec.seq:
            corrupt.append((sector, f"record {rec.seq} in sector {sector}"))
            continue
        records[rec.seq] = rec
    return Scan(records=records, corrupt=tuple(corrupt))


def read_raw(path: Path, fmt: str, *, with_backing: bool = True) -> bytes:
    """The guest-visible bytes of an image, through ``qemu-img convert -O raw``.

    ``with_backing=False`` reads only the clusters held by that qcow2 file
    (unallocated ones read as zeros).
    """
    spec: dict[str, object] = {
        "driver": fmt,
        "file": {"driver": "file", "filename": str(path)},
    }
    if not with_backing:
        spec["backing"] = None
    with tempfile.TemporaryDirectory(prefix="tb-raw-") as tmp:
        out = Path(tmp) / "view.raw"
        argv = ["qemu-img", "convert", "-U", "-O", "raw", "json:" + json.dumps(spec), str(out)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise TestbedError(f"qemu-img convert of {path} ({fmt}) failed: {proc.stderr.strip()}")
        return out.read_bytes()


@dataclass(frozen=True, kw_only=True)
class SnapshotMark:
    """What the guest had reported when a snapshot was taken.

    ``synced_before``: highest seq reported synced before the command was
    sent; ``synced_after``: highest when it returned (-1 for none).
    """

    overlay: Path
    synced_before: int
    synced_after: int


@dataclass(frozen=True, kw_only=True)
class ChainReport:
    """The outcome of :func:`verify_chain`, for logs and ``--json``."""

    records_found: int
    synced: int
    per_layer: tuple[tuple[str, int], ...]
    #: synced records missing from the whole chain
    lost: tuple[int, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def verified(self) -> int:
        """Synced records found intact in the chain."""
        return self.synced - len(self.lost)


def verify_chain(**kwargs: Any) -> ChainReport:
    """:func:`check_chain`, raising :class:`VerifyError` if it found problems."""
    report = check_chain(**kwargs)
    if report.problems:
        raise VerifyError(report.problems)
    return report


def check_chain(
    *,
    base: Path,
    base_format: str,
    marks: Sequence[SnapshotMark],
    synced: Iterable[int],
    layout: DiskLayout,
    run: str,
) -> ChainReport:
    """Check every synced record against a chain ``base <- marks[0].overlay <- ...``.

    - the whole chain (top with its backing) holds every synced record, all
      valid and none corrupt;
    - the image as it stood before snapshot ``i`` (layer ``i`` with its own
      backing) holds every record synced before the command was sent, and
      none started after the command returned.
    """
    synced_set = set(synced)
    layers: list[tuple[Path, str]] = [(base, base_format)]
    layers += [(m.overlay, "qcow2") for m in marks]
    problems: list[str] = []
    per_layer: list[tuple[str, int]] = []
    views = [scan(read_raw(p, f), layout, run) for p, f in layers]
    for (path, _), view in zip(layers, views, strict=True):
        per_layer.append((path.name, len(view.records)))
        for sector, why in view.corrupt:
            problems.append(f"{path.name}: sector {sector}: {why}")
    top = views[-1]
    lost = sorted(synced_set - top.seqs)
    if lost:
        problems.append(f"{layers[-1][0].name}: synced records missing from the chain: {lost}")
    for i, mark in enumerate(marks):
        older, view = layers[i][0], views[i]
        want = {s for s in synced_set if s <= mark.synced_before}
        missing = sorted(want - view.seqs)
        if missing:
            problems.append(
                f"{older.name}: records synced before snapshot {i + 1} missing: {missing}"
            )
        # The write of synced_after + 1 may have been in flight during the command.
        late = sorted(s for s in view.seqs if s > mark.synced_after + 1)
        if late:
            problems.append(f"{older.name}: records written after snapshot {i + 1}: {late}")
    return ChainReport(
        records_found=len(top.records),
        synced=len(synced_set),
        per_layer=tuple(per_layer),
        lost=tuple(lost),
        problems=tuple(problems),
    )
