"""``testbed boot``: boot the guest through -open-hook-fd and check its disk I/O."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from testbed.guest.artifacts import REPO
from testbed.guest.boot import BootOptions, BootResult, BrokerRestart, run_boot
from testbed.guest.console import StepResult
from testbed.guest.disk import FORMATS
from testbed.guest.jobrun import DEFAULT_SPEED
from testbed.guest.jobs import JobKind, MirrorVia
from testbed.guest.sandbox import Sandbox
from testbed.qemu.versions import DEFAULT_VERSION, VERSIONS

#: Records --job writes by default: enough to write on through every step.
JOB_RECORDS = 200

DESCRIPTION = """\
Boot the testbed guest (make guest) in the patched QEMU with -open-hook-fd:
a broker (granted the image directory) opens every file QEMU asks for.  The
guest reads a pattern the host wrote and checks it, writes sequence-numbered
records with sync, and powers off; the host then finds every record the guest
reported synced on the disk.  For vvfat the guest mounts the FAT disk and
checksums files from a host directory.  Each step is printed as it finishes;
the whole console goes to a log file with timestamps.

--job runs a block job live while the guest writes, then checks the image
the job left after power-off:
  commit  two snapshots; block-commit of the middle layer into the disk,
          then of the active layer (BLOCK_JOB_READY, block-job-complete);
          every synced record must be in the disk
  stream  two snapshots; block-stream with base=the disk, then without;
          every synced record must be in the top overlay, now standalone
  mirror  drive-mirror (or --mirror-via blockdev-mirror) sync=full to a new
          qcow2 created through the hook; block-job-complete pivots while
          the guest writes; the target must hold every synced record and
          qemu-img compare must find source and target equal up to the pivot
Each job is waited for by its QMP events, and the opens the broker answered
during it (with their flags) are printed and written to --json.
"""


def register(sub: Any) -> None:
    """Add ``testbed boot`` and its options to the CLI's subparsers.

    Long because it is one ``add_argument`` per option, each with its help:
    split up, the options would only be scattered over functions.
    """
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
        choices=[str(k) for k in JobKind],
        help="run a block job live while the guest writes (see above)",
    )
    p.add_argument(
        "--mirror-via",
        choices=[str(v) for v in MirrorVia],
        default=str(MirrorVia.DRIVE),
        help="the QMP command --job mirror uses (default drive-mirror)",
    )
    p.add_argument(
        "--kill-broker-at",
        type=int,
        metavar="N",
        help="run the broker as a process, SIGKILL it after record N while the guest writes, "
        "show a snapshot failing, attach a new broker over QMP (open-hook-set) and "
        "snapshot again (patch 0007)",
    )
    p.add_argument(
        "--sandbox",
        nargs="?",
        const=str(Sandbox.NAMESPACE),
        choices=[str(s) for s in Sandbox],
        help="keep QEMU off the image directory: namespace (the default when given alone) "
        "hides it under an empty tmpfs in a mount namespace; landlock confines QEMU with a "
        "Landlock ruleset granting nothing on it (testbed supervise --landlock-only, or "
        "--landlock with --supervise); only the hook (or the supervisor) reaches the images",
    )
    p.add_argument(
        "--supervise",
        action="store_true",
        help="run the version's stock QEMU (no patch, no hook) under the seccomp supervisor, "
        "which serves every open under the image grants (testbed supervise)",
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
        "--records",
        type=int,
        metavar="N",
        help=f"records the guest writes (default 40; {JOB_RECORDS} with --job)",
    )
    p.add_argument(
        "--speed",
        type=int,
        default=DEFAULT_SPEED,
        metavar="BYTES",
        help=f"rate limit of the --job jobs in bytes/s (default {DEFAULT_SPEED}; 0: none)",
    )
    p.add_argument(
        "--no-hook",
        dest="hook",
        action="store_false",
        help="the version's stock QEMU opening files itself (no broker), for comparison",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="where images and logs go (default build/boot/FORMAT[-JOB])",
    )
    p.add_argument(
        "--qemu-version",
        choices=list(VERSIONS),
        default=DEFAULT_VERSION,
        help=f"the QEMU version to boot (default {DEFAULT_VERSION}): its patched build, "
        "or with --no-hook its stock binary",
    )
    p.add_argument(
        "--qemu", type=Path, metavar="BINARY", help="QEMU binary to run (overrides --qemu-version)"
    )
    p.set_defaults(func=run)


def _options(args: argparse.Namespace, workdir: Path) -> BootOptions:
    return BootOptions(
        fmt=args.fmt,
        workdir=workdir,
        accel=args.accel,
        snapshot=args.snapshot,
        job=JobKind(args.job) if args.job else None,
        mirror_via=MirrorVia(args.mirror_via),
        sandbox=Sandbox(args.sandbox) if args.sandbox else None,
        supervise=args.supervise,
        hook=args.hook,
        records=args.records or (JOB_RECORDS if args.job else 40),
        speed=args.speed,
        keep=args.keep,
        qemu=args.qemu,
        qemu_version=args.qemu_version,
        kill_broker_at=args.kill_broker_at,
    )


def _print_jobs(result: BootResult) -> None:
    for job in result.jobs:
        print(
            f"job {job.job_id} ({job.command}): {job.seconds:.2f}s, "
            f"{len(job.events)} events, {job.records_during} records synced meanwhile, "
            f"chain after: {' <- '.join(reversed(job.chain_after))}"
        )
        if job.opens is None:
            print("  opens: not seen (no hook)")
        for o in job.opens or ():
            print(f"  open {o}")


def _print_restart(r: BrokerRestart) -> None:
    print(
        f"broker killed after record {r.killed_after}; the snapshot meanwhile failed: "
        f"{r.failed_snapshot}"
    )
    print(
        f"reattached: kill to first successful snapshot {r.kill_to_snapshot * 1000:.0f} ms "
        f"(new broker to snapshot {r.reattach_to_snapshot * 1000:.0f} ms); QEMU counts "
        f"{r.hook_requests} requests answered, audit logs {list(r.audit_per_broker)}"
    )


def _print_result(result: BootResult, *, supervise: bool) -> None:
    """Everything but the verdict: the QEMU, the records, the jobs, the broker."""
    print(
        f"QEMU {result.qemu_version}; accelerator: {result.accel}; "
        f"console log: {result.console_log}"
    )
    if result.records_written:
        print(
            f"records: {result.records_written} synced, {result.records_verified} verified, "
            f"{result.lost} lost; snapshots: {', '.join(result.snapshot_files) or 'none'}"
        )
    _print_jobs(result)
    if result.restart:
        _print_restart(result.restart)
    if result.final_image:
        print(f"final image: {result.final_image}")
    if result.broker_requests:
        server = "supervisor" if supervise else "broker"
        print(
            f"{server}: {result.broker_requests} opens answered, "
            f"{result.broker_errors} with -errno (refused, or probes of absent files)"
        )


def run(args: argparse.Namespace) -> int:
    name = f"{args.fmt}-{args.job}" if args.job else args.fmt
    workdir = args.workdir or REPO / "build" / "boot" / name
    start = time.monotonic()

    def show(step: StepResult) -> None:
        mark = "ok  " if step.ok else "FAIL"
        print(
            f"[{time.monotonic() - start:7.2f}s] {mark} {step.name:<22} "
            f"({step.seconds:.2f}s) {step.detail}",
            flush=True,
        )

    try:
        result = run_boot(_options(args, workdir), on_step=show)
    except ValueError as err:
        print(f"testbed boot: {err}", file=sys.stderr)
        return 2
    _print_result(result, supervise=args.supervise)
    if args.json:
        result.write_json(args.json)
    if result.error:
        print(f"testbed boot: FAILED: {result.error}", file=sys.stderr)
        return 1
    print(f"boot {args.fmt}: OK in {time.monotonic() - start:.1f}s")
    return 0
