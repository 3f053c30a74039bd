"""Disks for the guest: an image of each format holding the host's pattern,
and a directory of files for the vvfat (``fat:``) scenario."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import BuildError, GuestUsageError
from testbed.guest.records import SECTOR, DiskLayout, pattern_bytes

#: Formats the guest can boot with a writable disk; ``vvfat`` is read-only.
IMAGE_FORMATS = ("raw", "qcow2", "vmdk", "vpc", "vdi")
FORMATS = (*IMAGE_FORMATS, "vvfat")

#: Files placed in the vvfat directory: name -> size in bytes.
FAT_FILES = {"small.txt": 1000, "middle.bin": 100 * 1024, "large.bin": 1536 * 1024}


@dataclass(frozen=True, kw_only=True)
class Disk:
    """An image ready to attach: ``path`` opened with driver ``fmt``."""

    path: Path
    fmt: str
    #: for vvfat, the host files' sha256 by name
    fat_sums: tuple[tuple[str, str], ...] = ()


def _run(argv: list[str]) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except FileNotFoundError as err:
        raise BuildError(f"{argv[0]} not found (install qemu-utils)") from err
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(argv)} failed: {proc.stderr.strip()}", log=proc.stderr)


def make_disk(directory: Path, fmt: str, *, run: str, layout: DiskLayout) -> Disk:
    """Create the disk for ``fmt`` in ``directory``.

    Image formats get the pattern for ``run`` in the pattern area and zeros
    elsewhere; ``vvfat`` gets a directory of files with known checksums.
    """
    if fmt not in FORMATS:
        raise GuestUsageError(
            f"unknown guest disk format {fmt!r} (choose from {', '.join(FORMATS)})"
        )
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "vvfat":
        return _make_fat_dir(directory / "fat", run=run)
    raw = directory / "disk.raw"
    with raw.open("wb") as f:
        f.write(pattern_bytes(run, layout.pattern_sectors * SECTOR))
        f.truncate(layout.size)
    if fmt == "raw":
        return Disk(path=raw, fmt="raw")
    image = directory / f"disk.{fmt}"
    argv = ["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt]
    if fmt == "vpc":
        # the "current_size" variant keeps the size exact instead of rounding to CHS
        argv += ["-o", "force_size=on"]
    _run([*argv, str(raw), str(image)])
    raw.unlink()
    return Disk(path=image, fmt=fmt)


def _make_fat_dir(directory: Path, *, run: str) -> Disk:
    directory.mkdir(parents=True, exist_ok=True)
    sums = []
    for name, size in FAT_FILES.items():
        data = pattern_bytes(f"{run}/{name}", size)
        (directory / name).write_bytes(data)
        sums.append((name, hashlib.sha256(data).hexdigest()))
    return Disk(path=directory, fmt="vvfat", fat_sums=tuple(sums))
