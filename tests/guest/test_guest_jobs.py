"""Block jobs run live under the guest (``testbed boot --job``): commit, stream, mirror.

Each QEMU test is one boot (10-20 s under TCG on a loaded machine).  They
need ``make guest`` and ``make qemu`` (Debian's QEMU for the baseline); they
skip locally and fail under CI=true when those are missing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.cli import main
from testbed.errors import WaitTimeout
from testbed.guest.artifacts import guest_available
from testbed.guest.boot import BootOptions, run_boot
from testbed.guest.events import EventPattern, QMPEvent
from testbed.guest.jobrun import (
    MIRROR_TARGET,
    MirrorCheck,
    check_mirror,
    mirror_problems,
    run_program,
    verify_job,
)
from testbed.guest.jobs import (
    BrokerOpen,
    Compare,
    JobKind,
    JobRun,
    MirrorVia,
    qemu_img_compare,
    wait_completed,
)
from testbed.guest.records import SECTOR
from testbed.guest.sandbox import Sandbox
from testbed.guest.session import Session, SessionConfig
from testbed.pytest_plugin import require
from testbed.qemu import Kind
from testbed.qemu.fixtures import require_binary

RECORDS = 120


@pytest.fixture
def patched(qemu_version: str) -> Path:
    """The patched build of the test's QEMU version (every built one: in the test id)."""
    require(guest_available(), "the guest kernel and initramfs (run `make guest`)")
    return require_binary(qemu_version, Kind.PATCHED)


def opens_of(job: JobRun, name: str) -> list[BrokerOpen]:
    assert job.opens is not None
    return [o for o in job.opens if o.path == name]


# -- no QEMU -----------------------------------------------------------------


def test_event_pattern_matches_a_subset_of_data() -> None:
    event = QMPEvent.from_message(
        {
            "event": "JOB_STATUS_CHANGE",
            "data": {"id": "j1", "status": "ready"},
            "timestamp": {"seconds": 10, "microseconds": 500000},
        }
    )
    assert event.time == 10.5
    assert EventPattern(name="JOB_STATUS_CHANGE", data={"id": "j1"}).matches(event)
    assert not EventPattern(name="JOB_STATUS_CHANGE", data={"id": "j2"}).matches(event)
    assert not EventPattern(name="BLOCK_JOB_READY", data={"id": "j1"}).matches(event)


def _cmp(identical: bool, at: int | None = None) -> Compare:
    return Compare(identical=identical, mismatch_at=at, argv=("qemu-img",), output=f"at {at}")


def test_mirror_check_wants_equal_prefix_and_difference_exactly_at_the_pivot() -> None:
    good = MirrorCheck(prefix=_cmp(True), whole=_cmp(False, 4096), expected_mismatch=4096)
    assert mirror_problems(good) == []
    nothing_after = MirrorCheck(prefix=_cmp(True), whole=_cmp(True), expected_mismatch=None)
    assert mirror_problems(nothing_after) == []
    early = MirrorCheck(prefix=_cmp(False, 512), whole=_cmp(False, 512), expected_mismatch=4096)
    assert any("before the pivot" in p for p in mirror_problems(early))
    elsewhere = MirrorCheck(prefix=_cmp(True), whole=_cmp(False, 8192), expected_mismatch=4096)
    assert any("first differ at byte 4096" in p for p in mirror_problems(elsewhere))
    stray = MirrorCheck(prefix=_cmp(True), whole=_cmp(False, 4096), expected_mismatch=None)
    assert any("nothing was written after the pivot" in p for p in mirror_problems(stray))


@pytest.mark.images
def test_qemu_img_compare_of_a_prefix(tmp_path: Path) -> None:
    require(shutil.which("qemu-img") is not None, "qemu-img (qemu-utils)")
    a, b = tmp_path / "a.raw", tmp_path / "b.raw"
    a.write_bytes(bytes(64 * 1024))
    data = bytearray(64 * 1024)
    data[79 * 512] = 1
    b.write_bytes(bytes(data))
    assert qemu_img_compare(a, "raw", b, "raw", length=79 * 512).identical
    assert not qemu_img_compare(a, "raw", b, "raw", length=80 * 512).identical
    whole = qemu_img_compare(a, "raw", b, "raw")
    assert not whole.identical and whole.mismatch_at == 79 * 512
    with pytest.raises(ValueError, match="multiple of 512"):
        qemu_img_compare(a, "raw", b, "raw", length=1000)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--format", "vvfat", "--job", "commit"], "needs a writable image format"),
        (["--format", "raw", "--job", "stream", "--snapshot"], "takes its own snapshots"),
        (["--format", "raw", "--job", "mirror", "--records", "10"], "at least 30"),
        (["--format", "raw", "--job", "mirror", "--speed", "-1"], "--speed -1"),
    ],
)
def test_boot_job_rejects_bad_combinations(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["boot", *argv]) == 2
    assert message in capsys.readouterr().err


def test_boot_rejects_unknown_job(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["boot", "--format", "raw", "--job", "backup"])
    assert "invalid choice: 'backup'" in capsys.readouterr().err


# -- through the hook ----------------------------------------------------------


def session(tmp_path: Path, fmt: str, version: str, **kw: object) -> Session:
    config = SessionConfig(fmt=fmt, workdir=tmp_path / fmt, qemu_version=version, **kw)  # type: ignore[arg-type]
    return Session(config)


@pytest.mark.guest
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_commit_reopens_the_base_read_write_through_the_hook(
    patched: Path, tmp_path: Path, fmt: str, qemu_version: str
) -> None:
    with session(tmp_path, fmt, qemu_version) as s:
        assert s.disk is not None
        base = s.disk.path.name
        s.check_pattern()
        middle, active = run_program(s, JobKind.COMMIT, RECORDS, MirrorVia.DRIVE)
        # a wait for an event of a job that does not exist names the job
        with pytest.raises(WaitTimeout, match="block job 'no-such-job'"):
            wait_completed(s.vm, "no-such-job", timeout=0.3)
        s.shutdown()
        verdict = verify_job(s, JobKind.COMMIT, s.jobs)
    # the base, read-only under the snapshots, was reopened O_RDWR by each commit
    for job in (middle, active):
        assert any(o.writable and o.result == 0 for o in opens_of(job, base)), job.opens
    assert middle.chain_after == ("snap2.qcow2", base)
    assert active.chain_after == (base,)
    assert middle.seconds_to_ready is None and active.seconds_to_ready is not None
    names = [e.name for e in active.events]
    assert names.index("BLOCK_JOB_READY") < names.index("BLOCK_JOB_COMPLETED")
    assert [e.data.get("status") for e in active.events if e.name == "JOB_STATUS_CHANGE"][-1] == (
        "null"
    )
    # the guest wrote while each job was pending or ready
    assert middle.records_during >= 2 and active.records_during >= 2
    assert verdict.final_image == s.disk.path
    assert verdict.report.verified == RECORDS and not verdict.report.lost


@pytest.mark.guest
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_stream_with_then_without_base_leaves_a_standalone_top(
    patched: Path, tmp_path: Path, fmt: str, qemu_version: str
) -> None:
    with session(tmp_path, fmt, qemu_version) as s:
        assert s.disk is not None
        base = s.disk.path.name
        s.check_pattern()
        partial, whole = run_program(s, JobKind.STREAM, RECORDS, MirrorVia.DRIVE)
        s.shutdown()
        verdict = verify_job(s, JobKind.STREAM, s.jobs)
    assert partial.chain_after == ("snap2.qcow2", base)
    assert whole.chain_after == ("snap2.qcow2",)
    # a stream writes only the top: nothing below it is opened for writing
    for job in (partial, whole):
        assert all(o.path == "snap2.qcow2" for o in job.rw_opens), job.opens
    assert verdict.final_image.name == "snap2.qcow2"
    assert verdict.report.verified == RECORDS and not verdict.report.lost


@pytest.mark.guest
@pytest.mark.slow
@pytest.mark.parametrize("via", list(MirrorVia))
def test_mirror_target_is_created_through_the_hook_and_equals_the_source(
    patched: Path, tmp_path: Path, via: MirrorVia, qemu_version: str
) -> None:
    with session(tmp_path, "qcow2", qemu_version) as s:
        s.check_pattern()
        (job,) = run_program(s, JobKind.MIRROR, RECORDS, via)
        s.shutdown()
        verdict = verify_job(s, JobKind.MIRROR, s.jobs)
        assert s.disk is not None
        source = s.disk.path
    target = opens_of(job, MIRROR_TARGET)
    assert any("O_CREAT" in o.flags and o.result == 0 for o in target), job.opens
    assert job.chain_after == (MIRROR_TARGET,)
    mirror = verdict.mirror
    assert mirror is not None and mirror.prefix.identical
    assert job.synced_at_complete is not None and job.synced_at_complete > job.synced_at_start
    # the guest wrote on after the pivot, into the target only
    assert mirror.expected_mismatch is not None
    assert mirror.whole.mismatch_at == mirror.expected_mismatch
    assert verdict.report.verified == RECORDS
    # the comparison is not vacuous: a target that lost a record from before the pivot
    broken = tmp_path / "broken.qcow2"
    shutil.copyfile(verdict.final_image, broken)
    sector = s.config.layout.record_start + 0
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -z {sector * SECTOR} {SECTOR}", str(broken)],
        check=True,
        capture_output=True,
    )
    problems = mirror_problems(check_mirror(s, source, "qcow2", broken))
    assert any("differ before the pivot" in p for p in problems), problems


@pytest.mark.guest
@pytest.mark.slow
@pytest.mark.parametrize("kind", list(JobKind))
def test_sandboxed_jobs_work_only_through_the_hook(
    patched: Path, tmp_path: Path, kind: JobKind, qemu_version: str
) -> None:
    """The image directory is an empty tmpfs for QEMU: every open a job needs is the broker's.

    (Naming layers by file name failed here: QEMU looks them up with realpath().)
    """
    opts = BootOptions(
        fmt="qcow2",
        workdir=tmp_path / "sb",
        job=kind,
        sandbox=Sandbox.NAMESPACE,
        records=RECORDS,
        qemu_version=qemu_version,
    )
    result = run_boot(opts)
    assert result.ok, result.error
    assert result.lost == 0 and result.records_verified == RECORDS
    if kind is JobKind.COMMIT:
        assert all(j.rw_opens for j in result.jobs)
    if kind is JobKind.MIRROR:
        assert result.mirror is not None and result.mirror.prefix.identical


@pytest.mark.guest
@pytest.mark.slow
@pytest.mark.stock_qemu
@pytest.mark.parametrize("kind", list(JobKind))
def test_jobs_on_stock_qemu_without_hook(tmp_path: Path, kind: JobKind, qemu_version: str) -> None:
    """The same programs on the version's stock QEMU: tells guest bugs from hook bugs."""
    require(guest_available(), "the guest kernel and initramfs (run `make guest`)")
    require_binary(qemu_version, Kind.STOCK)
    opts = BootOptions(
        fmt="qcow2",
        workdir=tmp_path / str(kind),
        job=kind,
        hook=False,
        records=RECORDS,
        qemu_version=qemu_version,
    )
    result = run_boot(opts)
    assert result.ok, result.error
    assert result.lost == 0 and result.records_verified == RECORDS
    assert all(j.opens is None for j in result.jobs)
    assert result.to_json()["job_opens"] is None
