"""``testbed boot``: boot the guest through -open-hook-fd and check its disk I/O."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from testbed.guest.artifacts import REPO
from testbed.guest.boot import BootOptions, run_boot
from testbed.guest.console import StepResult
from testbed.guest.disk import FORMATS

DESCRIPTION = """\
Boot the testbed guest (make guest) in the patched QEMU with -open-hook-fd:
a broker (granted the image directory) opens every file QEMU asks for.  The
guest reads a pattern the host wrote and checks it, writes sequence-numbered
records with sync, and powers off; the host then finds every record the guest
reported synced on the disk.  With --job a block job (commit, stream,
mirror) runs over QMP while the guest writes, waited for by its events.
For vvfat the guest mounts the FAT disk and checksums files from a host
directory.  Each step is printed as it finishes;
the whole console goes to a log file with timestamps.
"""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "boot",
        help="boot the guest through the hook and check its disk I/O",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        dest="fmt",
        help="disk image format (vvfat: a read-only FAT view of a host directory)",
    )
    p.add_argument(
        "--snapshot",
        action="store_true",
        help="take an HMP then a QMP live snapshot while the guest writes",
    )
    p.add_argument(
        "--job",
        choices=("commit", "stream", "mirror"),
        help=(
            "run a block job while the guest writes: commit (a snapshot, then an active "
            "commit back into the base), stream (a snapshot, then stream the base into it), "
            "mirror (drive-mirror to a new qcow2, then pivot); every synced record must "
            "be in the result, and a mirror target must equal the source"
        ),
    )
    p.add_argument(
        "--sandbox",
        action="store_true",
        help="hide the image directory from QEMU in a mount namespace",
    )
    p.add_argument(
        "--accel",
        choices=("tcg", "kvm"),
        default="tcg",
        help="accelerator (default tcg; nested KVM is unreliable here)",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write the result as JSON")
    p.add_argument("--keep", action="store_true", help="keep the images after a good run")
    p.add_argument(
        "--records", type=int, default=40, metavar="N", help="records the guest writes (default 40)"
    )
    p.add_argument(
        "--no-hook",
        dest="hook",
        action="store_false",
        help="Debian's QEMU opening files itself (no broker), for comparison",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="where images and logs go (default build/boot/FORMAT)",
    )
    p.add_argument("--qemu", type=Path, metavar="BINARY", help="QEMU binary to run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    workdir = args.workdir or REPO / "build" / "boot" / args.fmt
    start = time.monotonic()

    def show(step: StepResult) -> None:
        mark = "ok  " if step.ok else "FAIL"
        print(
            f"[{time.monotonic() - start:7.2f}s] {mark} {step.name:<22} "
            f"({step.seconds:.2f}s) {step.detail}",
            flush=True,
        )

    try:
        opts = BootOptions(
            fmt=args.fmt,
            workdir=workdir,
            accel=args.accel,
            snapshot=args.snapshot,
            sandbox=args.sandbox,
            hook=args.hook,
            records=args.records,
            keep=args.keep,
            qemu=args.qemu,
            job=args.job,
        )
        result = run_boot(opts, on_step=show)
    except ValueError as err:
        print(f"testbed boot: {err}", file=sys.stderr)
        return 2
    print(f"accelerator: {result.accel}; console log: {result.console_log}")
    if result.records_written:
        print(
            f"records: {result.records_written} synced, {result.records_verified} verified, "
            f"{result.lost} lost; snapshots: {', '.join(result.snapshot_files) or 'none'}"
        )
    if result.job:
        print(
            f"job {result.job['job']}: records in {result.job['result']}"
            + (f"; qemu-img compare: {result.job['compare']}" if result.job["compare"] else "")
        )
    if result.broker_requests:
        print(
            f"broker: {result.broker_requests} opens answered, "
            f"{result.broker_errors} with -errno (refused, or probes of absent files)"
        )
    if args.json:
        result.write_json(args.json)
    if result.error:
        print(f"testbed boot: FAILED: {result.error}", file=sys.stderr)
        return 1
    print(f"boot {args.fmt}: OK in {time.monotonic() - start:.1f}s")
    return 0
