"""Helpers for the QEMU tests: images made with qemu-img, normalised opens."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from testbed.broker import AuditRecord

#: The first 4 KiB of every image's guest data; the rest is zero.
PATTERN = 0xAB
#: The content of the host file in the vvfat directory.
FAT_PATTERN = 0x5A
SIZE = 1 << 20


@dataclass(frozen=True, kw_only=True)
class Images:
    dir: Path
    raw: Path
    qcow2: Path  # backing file: raw
    vmdk_sparse: Path
    vmdk_flat: Path  # descriptor; the extent is vmdk_flat_extent
    vmdk_flat_extent: Path
    vpc: Path
    vdi: Path
    fat_dir: Path
    fat_file: Path


def qemu_img(*args: str) -> str:
    done = subprocess.run(
        ["qemu-img", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(args)} failed: {done.stderr}")
    return done.stdout


def make_images(tmp_path: Path) -> Images:
    d = tmp_path / "img"
    d.mkdir()
    raw = d / "base.raw"
    raw.write_bytes(bytes([PATTERN]) * 4096 + bytes(SIZE - 4096))
    qcow2 = d / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", raw.name, "-F", "raw", str(qcow2))
    sparse = d / "sparse.vmdk"
    qemu_img(
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicSparse",
        str(raw),
        str(sparse),
    )
    flat = d / "flat.vmdk"
    qemu_img(
        "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat", str(raw), str(flat)
    )
    vpc = d / "disk.vpc"
    qemu_img("convert", "-f", "raw", "-O", "vpc", str(raw), str(vpc))
    vdi = d / "disk.vdi"
    qemu_img("convert", "-f", "raw", "-O", "vdi", str(raw), str(vdi))
    fat_dir = d / "fat"
    fat_dir.mkdir()
    fat_file = fat_dir / "hello.txt"
    fat_file.write_bytes(bytes([FAT_PATTERN]) * 2048)
    return Images(
        dir=d,
        raw=raw,
        qcow2=qcow2,
        vmdk_sparse=sparse,
        vmdk_flat=flat,
        vmdk_flat_extent=d / "flat-flat.vmdk",
        vpc=vpc,
        vdi=vdi,
        fat_dir=fat_dir,
        fat_file=fat_file,
    )


Open = tuple[str, str]
#: Flags that say nothing about what is opened (DESIGN.md section 4).
IGNORED_FLAGS = {"O_CLOEXEC", "O_LARGEFILE"}


def normalise(path: str, flags: Iterable[str], root: Path) -> Open | None:
    """(path relative to root, flags as "A|B") or None for a file outside root."""
    try:
        rel = os.path.relpath(path, root)
    except ValueError:
        return None
    if rel.startswith(".."):
        return None
    return rel, "|".join(f for f in flags if f not in IGNORED_FLAGS)


def select_opens(records: Iterable[AuditRecord], root: Path) -> list[Open]:
    """The audit records of files below a directory, normalised, in order."""
    out = []
    for r in records:
        n = normalise(r.path, r.flag_names, root)
        if n is not None:
            out.append(n)
    return out


def strace_opens(trace: Path, root: Path) -> list[Open]:
    """openat() calls below ``root`` in an ``strace -f -e trace=openat`` log, normalised."""
    out = []
    for line in trace.read_text().splitlines():
        start = line.find('openat(AT_FDCWD, "')
        if start < 0:
            continue
        rest = line[start + len('openat(AT_FDCWD, "') :]
        path, _, rest = rest.partition('", ')
        flags = rest.split(")")[0].split(",")[0].split(" ")[0]
        n = normalise(path, flags.split("|"), root)
        if n is not None:
            out.append(n)
    return out
