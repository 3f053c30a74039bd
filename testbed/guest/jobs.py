"""``testbed boot --job commit|stream|mirror``: a block job runs while the guest writes.

Each job runs live, over QMP, between the guest's record writes, and is
waited for by its QMP events with a timeout that names the job:

``commit``  a ``blockdev-snapshot-sync`` overlay is taken while the guest writes,
            then ``block-commit`` of the active layer into the base, ``BLOCK_JOB_READY``,
            ``block-job-complete`` (the device pivots onto the base), ``COMPLETED``;
            the guest goes on writing into the base.  Every synced record must be
            in the base, which has no backing file.
``stream``  the same overlay, then ``block-stream`` of the whole chain into it;
            afterwards the overlay stands alone (no backing file) and must hold
            every synced record.
``mirror``  ``drive-mirror sync=full`` to a new qcow2 while the guest writes,
            ``BLOCK_JOB_READY``; once the writer is done ``block-job-complete``
            pivots onto the target.  The target must hold every synced record and
            equal the source (``qemu-img compare``).
"""

from __future__ import annotations

import enum
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.errors import QEMUError, WaitTimeout
from testbed.guest.records import VerifyError, read_raw, scan
from testbed.guest.session import DRIVE_ID, Session

JOB_ID = "job0"


class GuestJob(enum.StrEnum):
    COMMIT = "commit"
    STREAM = "stream"
    MIRROR = "mirror"


@dataclass(frozen=True, kw_only=True)
class JobReport:
    job: GuestJob
    #: The image that must hold every record once the guest powered off.
    result: Path
    result_format: str
    seconds: float
    #: What ``qemu-img compare`` said (mirror only).
    compare: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "job": str(self.job),
            "result": str(self.result),
            "result_format": self.result_format,
            "seconds": round(self.seconds, 3),
            "compare": self.compare,
        }


def wait_job(session: Session, event: str, *, timeout: float) -> dict[str, Any]:
    """The job's next ``event``; the guest's console is read meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        for e in session.vm.events():
            data = e.get("data") or {}
            if data.get("device") != JOB_ID:
                continue
            if e.get("event") == event:
                return e
            if e.get("event") in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR"):
                raise QEMUError(
                    f"block job {JOB_ID!r} ended with {e['event']} "
                    f"({data.get('error', 'no error given')}) while waiting for {event}"
                )
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"QMP event {event} of block job {JOB_ID!r}", timeout)
        session.drain(window=0.05)


def run_job(session: Session, job: GuestJob, records: int) -> JobReport:
    """Start the writer, run ``job`` while it writes, finish the writer."""
    assert session.disk is not None
    timeout = session.config.step_timeout
    vm = session.vm
    t0 = time.monotonic()
    session.start_writer(records)
    session.wait_synced(records // 4)
    if job is GuestJob.MIRROR:
        target = session.image_dir / "mirror.qcow2"
        vm.qmp(
            "drive-mirror",
            **{"device": DRIVE_ID, "job-id": JOB_ID, "target": str(target)},
            format="qcow2",
            sync="full",
        )
        wait_job(session, "BLOCK_JOB_READY", timeout=timeout)
        session.note("mirror ready", True, time.monotonic() - t0, f"{target.name} in sync")
        # the mirror keeps up with the guest's writes until it is completed
        session.finish_writer()
        vm.qmp("block-job-complete", device=JOB_ID)
        wait_job(session, "BLOCK_JOB_COMPLETED", timeout=timeout)
        session.note("mirror", True, time.monotonic() - t0, f"pivoted onto {target.name}")
        return JobReport(job=job, result=target, result_format="qcow2", seconds=0.0)
    overlay = session.snapshot("qmp").overlay
    session.wait_synced(records // 2)
    if job is GuestJob.COMMIT:
        vm.qmp("block-commit", **{"device": DRIVE_ID, "job-id": JOB_ID})
        wait_job(session, "BLOCK_JOB_READY", timeout=timeout)
        vm.qmp("block-job-complete", device=JOB_ID)
        wait_job(session, "BLOCK_JOB_COMPLETED", timeout=timeout)
        result, fmt = session.disk.path, session.disk.fmt
        detail = f"{overlay.name} committed into {result.name}"
    else:
        vm.qmp("block-stream", **{"device": DRIVE_ID, "job-id": JOB_ID})
        wait_job(session, "BLOCK_JOB_COMPLETED", timeout=timeout)
        result, fmt = overlay, "qcow2"
        detail = f"{session.disk.path.name} streamed into {overlay.name}"
    session.note(str(job), True, time.monotonic() - t0, detail)
    session.finish_writer()
    return JobReport(job=job, result=result, result_format=fmt, seconds=time.monotonic() - t0)


def verify_job(session: Session, report: JobReport) -> tuple[int, list[int], str]:
    """(records verified, records lost, qemu-img compare's answer) after power-off."""
    assert session.disk is not None
    layout = session.config.layout
    problems: list[str] = []
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(report.result)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    )
    if "backing-filename" in info:
        problems.append(
            f"{report.result.name} still has a backing file ({info['backing-filename']})"
        )
    view = scan(read_raw(report.result, report.result_format), layout, session.run)
    synced = set(session.synced)
    lost = sorted(synced - view.seqs)
    if lost:
        problems.append(f"{report.result.name}: synced records missing: {lost}")
    problems += [f"{report.result.name}: sector {s}: {why}" for s, why in view.corrupt]
    compared = ""
    if report.job is GuestJob.MIRROR:
        done = subprocess.run(
            ["qemu-img", "compare", "-U", "-f", session.disk.fmt, "-F", "qcow2",
             str(session.disk.path), str(report.result)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        compared = (done.stdout or done.stderr).strip()
        if done.returncode != 0:
            problems.append(f"qemu-img compare source target: {compared}")
    verified = len(synced) - len(lost)
    session.note(
        "verify",
        not problems,
        0.0,
        f"{verified}/{len(synced)} synced records in {report.result.name}"
        + (f"; {compared}" if compared else ""),
    )
    if problems:
        raise VerifyError(problems)
    return verified, lost, compared
