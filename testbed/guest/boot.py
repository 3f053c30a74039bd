"""``testbed boot``: one guest boot through the hook, as a scenario with a result.

The scenario: boot; check the host's pattern (or, for vvfat, the host's
files); write records with sync (taking an HMP then a QMP live snapshot
while the guest writes, with ``snapshot``; or running a block job, with
``job``: :mod:`testbed.guest.jobs`); power off from inside; verify on the
host that every record the guest reported synced is in the chain (or in the
image the job left).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import TestbedError
from testbed.guest.console import StepResult
from testbed.guest.jobs import GuestJob, JobReport, run_job, verify_job
from testbed.guest.records import DiskLayout
from testbed.guest.session import Session, SessionConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BootOptions:
    fmt: str
    workdir: Path
    accel: str = "tcg"
    snapshot: bool = False
    sandbox: bool = False
    hook: bool = True
    records: int = 40
    keep: bool = False
    guest_dir: Path | None = None
    qemu: Path | None = None
    #: ``commit``, ``stream`` or ``mirror``: run that block job while the guest writes
    job: str | None = None


@dataclass(frozen=True, kw_only=True)
class BootResult:
    """What ``--json`` writes."""

    format: str
    accel: str
    booted: bool
    steps: tuple[StepResult, ...]
    records_written: int
    records_verified: int
    lost: int
    snapshot_files: tuple[str, ...]
    console_log: str
    #: requests the broker answered, and how many got -errno (refused or absent)
    broker_requests: int = 0
    broker_errors: int = 0
    error: str | None = None
    #: ``--job``: the job, the image that holds the records, qemu-img compare's answer
    job: dict[str, object] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, object]:
        return {
            "format": self.format,
            "accel": self.accel,
            "booted": self.booted,
            "steps": [s.as_dict() for s in self.steps],
            "records_written": self.records_written,
            "records_verified": self.records_verified,
            "lost": self.lost,
            "snapshot_files": list(self.snapshot_files),
            "console_log": self.console_log,
            "broker_requests": self.broker_requests,
            "broker_errors": self.broker_errors,
            "error": self.error,
            "job": self.job,
        }

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")


def run_boot(
    opts: BootOptions, *, on_step: Callable[[StepResult], None] | None = None
) -> BootResult:
    """Run the boot scenario; errors end up in ``BootResult.error``, not raised."""
    if opts.snapshot and opts.fmt == "vvfat":
        raise ValueError("--snapshot needs a writable image format, not vvfat")
    if opts.sandbox and opts.fmt == "vvfat":
        # QEMU scans a fat: directory with opendir/readdir, which no hook in
        # qemu_open sees (DESIGN.md section 3), so a hidden directory reads as empty.
        raise ValueError(
            "--sandbox cannot be used with vvfat: QEMU reads the directory "
            "listing with opendir(), which does not go through the hook"
        )
    if opts.job is not None and opts.fmt == "vvfat":
        raise ValueError("--job needs a writable image format, not vvfat")
    if opts.job is not None and opts.snapshot:
        raise ValueError("--job and --snapshot do not go together (a job takes its own)")
    if opts.job is not None and opts.job not in {j.value for j in GuestJob}:
        raise ValueError(f"--job {opts.job}: not one of {', '.join(j.value for j in GuestJob)}")
    if opts.records < 4:
        raise ValueError(f"--records {opts.records}: need at least 4")
    config = SessionConfig(
        fmt=opts.fmt,
        workdir=opts.workdir,
        accel=opts.accel,
        hook=opts.hook,
        sandbox=opts.sandbox,
        qemu=opts.qemu,
        guest_dir=opts.guest_dir,
        layout=DiskLayout(),
    )
    session = Session(config, on_step=on_step)
    error: str | None = None
    job: JobReport | None = None
    verified: tuple[int, list[int], str] | None = None
    try:
        session.start()
        if opts.fmt == "vvfat":
            session.check_fat()
        elif opts.job is not None:
            session.check_pattern()
            job = run_job(session, GuestJob(opts.job), opts.records)
        else:
            session.check_pattern()
            session.start_writer(opts.records)
            if opts.snapshot:
                # two snapshots in a row while the guest writes: a chain of three
                session.wait_synced(opts.records // 4)
                session.snapshot("hmp")
                session.wait_synced(opts.records // 2)
                session.snapshot("qmp")
            session.finish_writer()
        session.shutdown()
        if job is not None:
            verified = verify_job(session, job)
        elif opts.fmt != "vvfat":
            session.verify()
    except TestbedError as err:
        error = str(err)
        log.error("%s", err)
    finally:
        session.close()
    report = session.report
    audit = session.audit_records()
    if job is not None:
        n_verified = verified[0] if verified else 0
        n_lost = len(verified[1]) if verified else len(session.synced)
    else:
        n_verified = report.verified if report else 0
        n_lost = len(report.lost) if report else len(session.synced)
    result = BootResult(
        format=opts.fmt,
        accel=session.accel_used or opts.accel,
        booted=session.booted,
        steps=tuple(session.console.steps) if session.console else (),
        records_written=len(session.synced),
        records_verified=n_verified,
        lost=n_lost,
        snapshot_files=tuple(str(m.overlay) for m in session.marks),
        console_log=str(session.console_log),
        broker_requests=len(audit),
        broker_errors=sum(1 for r in audit if r.result < 0),
        error=error,
        job={**job.as_dict(), "compare": verified[2] if verified else ""} if job else None,
    )
    if not opts.keep and error is None:
        shutil.rmtree(session.image_dir, ignore_errors=True)
    return result
