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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from testbed.broker import read_audit
from testbed.errors import GuestError, GuestUsageError, QEMUError, TestbedError
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
from testbed.guest.sandbox import Sandbox
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
    #: confine QEMU: a mount namespace or Landlock (testbed.guest.sandbox)
    sandbox: Sandbox | None = None
    #: a stock QEMU whose opens the seccomp supervisor serves (implies no hook)
    supervise: bool = False
    hook: bool = True
    records: int = 40
    keep: bool = False
    guest_dir: Path | None = None
    qemu: Path | None = None
    qemu_version: str | None = None
    #: SIGKILL the broker process after record N, then restart it (patch 0007)
    kill_broker_at: int | None = None


@dataclass(frozen=True, kw_only=True)
class BrokerRestart:
    """What ``--kill-broker-at`` saw: the failure, the reattach, and the accounting."""

    killed_after: int
    #: QEMU's error for the snapshot taken while no broker served the hook
    failed_snapshot: str
    #: seconds from SIGKILL to the first successful snapshot (the failing one included)
    kill_to_snapshot: float
    #: seconds from starting the new broker to that snapshot done
    reattach_to_snapshot: float
    #: query-open-hook before power-off, and the audit records of each broker
    hook_requests: int
    hook_failures: int
    audit_per_broker: tuple[int, ...]

    @property
    def accounted(self) -> bool:
        """Every request QEMU says a broker answered is in one of the audit logs."""
        return sum(self.audit_per_broker) == self.hook_requests

    def to_json(self) -> dict[str, object]:
        return {
            "killed_after": self.killed_after,
            "failed_snapshot": self.failed_snapshot,
            "kill_to_snapshot": round(self.kill_to_snapshot, 3),
            "reattach_to_snapshot": round(self.reattach_to_snapshot, 3),
            "hook_requests": self.hook_requests,
            "hook_failures": self.hook_failures,
            "audit_per_broker": list(self.audit_per_broker),
            "accounted": self.accounted,
        }


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
    restart: BrokerRestart | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, object]:
        return {
            "format": self.format,
            "qemu_version": self.qemu_version,
            "accel": self.accel,
            "booted": self.booted,
            "steps": [s.to_json() for s in self.steps],
            "records_written": self.records_written,
            "records_verified": self.records_verified,
            "lost": self.lost,
            "snapshot_files": list(self.snapshot_files),
            "console_log": self.console_log,
            "broker_requests": self.broker_requests,
            "broker_errors": self.broker_errors,
            "error": self.error,
            "job": str(self.job) if self.job else None,
            "jobs": [j.to_json() for j in self.jobs],
            "job_opens": (
                sum(len(j.opens or ()) for j in self.jobs)
                if self.jobs and all(j.opens is not None for j in self.jobs)
                else None
            ),
            "final_image": self.final_image,
            "mirror_compare": self.mirror.to_json() if self.mirror else None,
            "broker_restart": self.restart.to_json() if self.restart else None,
        }

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")


def check_options(opts: BootOptions) -> None:
    """:class:`GuestUsageError` when the options do not go together (before anything boots)."""
    if opts.snapshot and opts.fmt == "vvfat":
        raise GuestUsageError("--snapshot needs a writable image format, not vvfat")
    if opts.records < 4:
        raise GuestUsageError(f"--records {opts.records}: need at least 4")
    if opts.job is not None:
        _check_job_options(opts, opts.job)
    if opts.kill_broker_at is not None:
        _check_kill_broker_options(opts, opts.kill_broker_at)
    if opts.supervise and opts.sandbox is Sandbox.NAMESPACE:
        raise GuestUsageError("--supervise confines with --sandbox landlock, not namespace")


def _check_job_options(opts: BootOptions, job: JobKind) -> None:
    if opts.fmt not in IMAGE_FORMATS:
        raise GuestUsageError(f"--job {job} needs a writable image format, not {opts.fmt}")
    if opts.snapshot:
        raise GuestUsageError(f"--job {job} takes its own snapshots: drop --snapshot")
    if opts.speed < 0:
        raise GuestUsageError(f"--speed {opts.speed}: must be 0 (no limit) or positive")
    if opts.records < MIN_JOB_RECORDS:
        raise GuestUsageError(
            f"--records {opts.records}: --job needs at least {MIN_JOB_RECORDS} "
            "to spread its steps over"
        )


def _check_kill_broker_options(opts: BootOptions, at: int) -> None:
    if opts.fmt not in IMAGE_FORMATS or opts.job is not None or opts.snapshot:
        raise GuestUsageError(
            "--kill-broker-at takes its own snapshots on a writable image: "
            "no vvfat, --job or --snapshot"
        )
    if not opts.hook or opts.supervise:
        raise GuestUsageError("--kill-broker-at needs the hook (drop --no-hook, --supervise)")
    if not 0 <= at <= opts.records - 4:
        raise GuestUsageError(
            f"--kill-broker-at {at}: must be between 0 and "
            f"{opts.records - 4} (--records {opts.records} minus 4, to write on after it)"
        )


def _session_config(opts: BootOptions) -> SessionConfig:
    return SessionConfig(
        fmt=opts.fmt,
        workdir=opts.workdir,
        accel=opts.accel,
        hook=opts.hook and not opts.supervise,
        supervise=opts.supervise,
        broker_process=opts.kill_broker_at is not None,
        sandbox=opts.sandbox,
        qemu=opts.qemu,
        qemu_version=opts.qemu_version,
        guest_dir=opts.guest_dir,
        layout=DiskLayout(),
    )


def _write_with_snapshots(session: Session, opts: BootOptions) -> None:
    """The guest writes its records; with ``--snapshot``, two live snapshots meanwhile."""
    session.start_writer(opts.records)
    if opts.snapshot:
        # two snapshots in a row while the guest writes: a chain of three
        session.wait_synced(opts.records // 4)
        session.snapshot("hmp")
        session.wait_synced(opts.records // 2)
        session.snapshot("qmp")
    session.finish_writer()


def _result(
    opts: BootOptions,
    session: Session,
    *,
    error: str | None,
    verdict: JobVerdict | None,
    restart: BrokerRestart | None,
) -> BootResult:
    report = session.report
    audit = session.audit_records()
    return BootResult(
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
        restart=restart,
    )


def run_boot(
    opts: BootOptions, *, on_step: Callable[[StepResult], None] | None = None
) -> BootResult:
    """Run the boot scenario; errors end up in ``BootResult.error``, not raised.

    Options that do not go together raise :class:`GuestUsageError` (also a
    ``ValueError``) before anything starts.
    """
    check_options(opts)
    session = Session(_session_config(opts), on_step=on_step)
    error: str | None = None
    verdict: JobVerdict | None = None
    # kept when a later step fails: the result then still shows the restart
    restart: BrokerRestart | None = None
    try:
        session.start()
        if opts.fmt == "vvfat":
            session.check_fat()
        else:
            session.check_pattern()
        if opts.job is not None:
            run_program(session, opts.job, opts.records, opts.mirror_via, opts.speed)
        elif opts.kill_broker_at is not None:
            session.start_writer(opts.records)
            restart = kill_and_reattach(session, opts.kill_broker_at, opts.records)
            session.finish_writer()
        elif opts.fmt != "vvfat":
            _write_with_snapshots(session, opts)
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
    result = _result(opts, session, error=error, verdict=verdict, restart=restart)
    if not opts.keep and error is None:
        shutil.rmtree(session.image_dir, ignore_errors=True)
    return result


def kill_and_reattach(session: Session, at: int, records: int) -> BrokerRestart:
    """SIGKILL the broker after record ``at``; a snapshot fails; a new broker; one succeeds.

    The guest writes on throughout, through the descriptors QEMU holds.
    Raises :class:`TestbedError` when a step does not behave so.
    """
    session.wait_synced(at)
    session.kill_broker()
    killed = session.killed_at
    assert killed is not None
    # the guest does not notice: it syncs on through the descriptors QEMU holds
    session.wait_synced(min(at + 2, records - 2))
    try:
        session.snapshot("qmp", name="snap-dead-broker.qcow2")
    except QEMUError as err:
        failed = str(err)
    else:
        raise GuestError("broker restart", "a snapshot succeeded with the broker killed")
    if "open hook" not in failed:
        raise GuestError(
            "broker restart", f"the snapshot failed, but not with the hook's error: {failed}"
        )
    t_reattach = time.monotonic()
    session.restart_broker()
    session.snapshot("qmp")
    done = time.monotonic()
    state = session.open_hook_state()
    if state.get("state") != "connected":
        raise GuestError("broker restart", f"query-open-hook after the reattach: {state}")
    per_broker = tuple(len(read_audit(p)) if p.exists() else 0 for p in session.audit_paths)
    result = BrokerRestart(
        killed_after=at,
        failed_snapshot=failed,
        kill_to_snapshot=done - killed,
        reattach_to_snapshot=done - t_reattach,
        hook_requests=int(str(state.get("requests", -1))),
        hook_failures=int(str(state.get("failures", -1))),
        audit_per_broker=per_broker,
    )
    session.note(
        "broker accounting",
        result.accounted,
        0.0,
        f"QEMU: {result.hook_requests} requests answered; audit logs: {list(per_broker)}",
    )
    if not result.accounted:
        raise GuestError(
            "broker restart",
            f"QEMU says {result.hook_requests} requests were answered, the audit logs "
            f"hold {sum(per_broker)} ({list(per_broker)})",
        )
    return result
