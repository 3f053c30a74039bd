"""``testbed boot``: one guest boot through the hook, as a scenario with a result.

The scenario: boot; check the host's pattern (or, for vvfat, the host's
files); write records with sync (taking an HMP then a QMP live snapshot
while the guest writes, with ``snapshot``; or running a block job program,
with ``job``: see :mod:`testbed.guest.jobrun`); power off from inside;
verify on the host that every record the guest reported synced is in the
chain (or in the image the job left).
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
from testbed.guest.disk import IMAGE_FORMATS
from testbed.guest.jobrun import (
    DEFAULT_SPEED,
    MIN_JOB_RECORDS,
    JobVerdict,
    MirrorCheck,
    run_program,
    verify_job,
)
from testbed.guest.jobs import JobKind, JobRun, MirrorVia
from testbed.guest.records import DiskLayout
from testbed.guest.session import Session, SessionConfig
from testbed.qemu.versions import DEFAULT_VERSION

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BootOptions:
    fmt: str
    workdir: Path
    accel: str = "tcg"
    snapshot: bool = False
    #: a block job program to run while the guest writes (testbed.guest.jobrun)
    job: JobKind | None = None
    mirror_via: MirrorVia = MirrorVia.DRIVE
    #: the jobs' rate limit in bytes/s (0: none)
    speed: int = DEFAULT_SPEED
    sandbox: bool = False
    hook: bool = True
    records: int = 40
    keep: bool = False
    guest_dir: Path | None = None
    qemu: Path | None = None
    qemu_version: str | None = None


@dataclass(frozen=True, kw_only=True)
class BootResult:
    """What ``--json`` writes."""

    format: str
    accel: str
    booted: bool
    qemu_version: str
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
    job: JobKind | None = None
    jobs: tuple[JobRun, ...] = ()
    #: the image that holds the disk after the job (power-off), and the mirror comparison
    final_image: str | None = None
    mirror: MirrorCheck | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, object]:
        return {
            "format": self.format,
            "qemu_version": self.qemu_version,
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
            "job": str(self.job) if self.job else None,
            "jobs": [j.as_dict() for j in self.jobs],
            "job_opens": (
                sum(len(j.opens or ()) for j in self.jobs)
                if self.jobs and all(j.opens is not None for j in self.jobs)
                else None
            ),
            "final_image": self.final_image,
            "mirror_compare": self.mirror.as_dict() if self.mirror else None,
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
    if opts.records < 4:
        raise ValueError(f"--records {opts.records}: need at least 4")
    if opts.job is not None:
        if opts.fmt not in IMAGE_FORMATS:
            raise ValueError(f"--job {opts.job} needs a writable image format, not {opts.fmt}")
        if opts.snapshot:
            raise ValueError(f"--job {opts.job} takes its own snapshots: drop --snapshot")
        if opts.speed < 0:
            raise ValueError(f"--speed {opts.speed}: must be 0 (no limit) or positive")
        if opts.records < MIN_JOB_RECORDS:
            raise ValueError(
                f"--records {opts.records}: --job needs at least {MIN_JOB_RECORDS} "
                "to spread its steps over"
            )
    config = SessionConfig(
        fmt=opts.fmt,
        workdir=opts.workdir,
        accel=opts.accel,
        hook=opts.hook,
        sandbox=opts.sandbox,
        qemu=opts.qemu,
        qemu_version=opts.qemu_version,
        guest_dir=opts.guest_dir,
        layout=DiskLayout(),
    )
    session = Session(config, on_step=on_step)
    error: str | None = None
    verdict: JobVerdict | None = None
    try:
        session.start()
        if opts.fmt == "vvfat":
            session.check_fat()
        elif opts.job is not None:
            session.check_pattern()
            run_program(session, opts.job, opts.records, opts.mirror_via, opts.speed)
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
        if opts.job is not None:
            verdict = verify_job(session, opts.job, session.jobs)
        elif opts.fmt != "vvfat":
            session.verify()
    except TestbedError as err:
        error = str(err)
        log.error("%s", err)
    finally:
        session.close()
    report = session.report
    audit = session.audit_records()
    result = BootResult(
        format=opts.fmt,
        qemu_version=opts.qemu_version or DEFAULT_VERSION,
        accel=session.accel_used or opts.accel,
        booted=session.booted,
        steps=tuple(session.console.steps) if session.console else (),
        records_written=len(session.synced),
        records_verified=report.verified if report else 0,
        lost=len(report.lost) if report else len(session.synced),
        snapshot_files=tuple(str(m.overlay) for m in session.marks),
        console_log=str(session.console_log),
        broker_requests=len(audit),
        broker_errors=sum(1 for r in audit if r.result < 0),
        error=error,
        job=opts.job,
        jobs=tuple(session.jobs),
        final_image=str(verdict.final_image) if verdict else None,
        mirror=verdict.mirror if verdict else None,
    )
    if not opts.keep and error is None:
        shutil.rmtree(session.image_dir, ignore_errors=True)
    return result
