"""What ``testbed boot --job commit|stream|mirror`` does while the guest writes.

Each program starts the guest's writer, changes the disk's chain live with
snapshots and block jobs, checks the chain QEMU reports after each job,
lets the writer finish, has the guest read the host's pattern again, and
returns the :class:`JobRun` of each job.  :func:`verify_job` then checks,
after power-off, the image the program left (see docs/guest.md):

- ``commit``: two snapshots (disk <- snap1 <- snap2), ``block-commit`` of
  the middle layer into the disk (intermediate: no READY, chain becomes
  disk <- snap2), then of the active layer (READY, ``block-job-complete``;
  chain becomes the disk alone).  Every synced record must be in the disk.
- ``stream``: the same two snapshots, ``block-stream`` with ``base`` = the
  disk (chain disk <- snap2), then without ``base`` (snap2 alone, no
  backing file).  Every synced record must be in snap2 on its own; the
  disk and snap1, which a stream never writes, still hold what they held.
- ``mirror``: ``drive-mirror`` (or ``blockdev-create`` + ``blockdev-add`` +
  ``blockdev-mirror``) with ``sync: full`` to a new qcow2 target that QEMU
  creates through the hook; READY, ``block-job-complete`` pivots, the guest
  writes on into the target.  The target must hold every synced record;
  the source everything synced before the pivot and nothing after; and
  ``qemu-img compare`` must find source and target identical up to the
  first record written after the pivot, and differ exactly there.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.errors import GuestError, QEMUError, TestbedError
from testbed.guest.jobs import (
    BrokerOpen,
    Compare,
    JobKind,
    JobRun,
    JobTimer,
    MirrorVia,
    backing_chain,
    format_node,
    node_files,
    qemu_img_compare,
    run_create_job,
    wait_completed,
    wait_gone,
    wait_pending,
    wait_ready,
)
from testbed.guest.records import (
    SECTOR,
    ChainReport,
    SnapshotMark,
    VerifyError,
    pattern_bytes,
    read_raw,
    scan,
)
from testbed.guest.session import DRIVE_ID, Session

#: What the mirror target is called in the image directory, and its nodes.
MIRROR_TARGET = "mirror.qcow2"
MIRROR_FILE_NODE = "mirror-file"
MIRROR_NODE = "mirror-target"

#: Fewest records a job program can spread its steps over.
MIN_JOB_RECORDS = 30
#: Records the guest writes while a job is ready (before block-job-complete)
#: and while it is pending (before job-finalize).
WRITES_BETWEEN = 2
#: Default rate limit of the jobs (bytes/s): a full mirror or stream of the
#: 16 MiB disk then takes about 2 s, long enough for the guest to write into it.
DEFAULT_SPEED = 8 * 1024 * 1024


def _last(s: Session) -> int:
    return s.synced[-1] if s.synced else -1


def _write_on(s: Session, count: int) -> int:
    """Wait until the guest has synced ``count`` records it had not printed yet."""
    # SYNCED lines already in the console buffer were written earlier: read them first
    s.drain(window=0.02)
    if s.writer_done:
        raise GuestError(
            "write",
            f"the writer ended before the job was done (give more --records than {len(s.synced)})",
        )
    s.wait_synced(_last(s) + count)
    return _last(s)


@dataclass(frozen=True, kw_only=True)
class _Window:
    """Where the session stood when a job started: what came after is the job's."""

    synced: int
    audit: int
    events: int
    timer: JobTimer

    @classmethod
    def open(cls, s: Session) -> _Window:
        s.drain(window=0.05)
        return cls(
            synced=_last(s), audit=len(s.audit_records()), events=len(s.vm.seen), timer=JobTimer()
        )


@dataclass(frozen=True, kw_only=True)
class _Progress:
    """What a job's steps saw: the commands prepare ran, when it got ready and pending."""

    prepared: tuple[str, ...]
    ready_at: float | None
    pending_at: float
    #: the last record synced when block-job-complete / job-finalize was sent
    at_complete: int | None
    at_finalize: int | None
    #: from the job's start to its disappearance, and the last record synced then
    seconds: float
    at_end: int
    chain: tuple[str, ...]


def _job_arguments(
    job_id: str, arguments: Mapping[str, Any], *, complete: bool, speed: int
) -> dict[str, Any]:
    args: dict[str, Any] = {"job-id": job_id, **arguments}
    if not complete:
        # mirror-like jobs keep the source drained from their last pass to the
        # graph change, so the guest could not write while they are pending
        args["auto-finalize"] = False
    if speed:
        args["speed"] = speed
    return args


def _drive_job(
    s: Session,
    job_id: str,
    command: str,
    args: dict[str, Any],
    window: _Window,
    *,
    complete: bool,
    prepare: Callable[[], Sequence[str]] | None,
    expect: Sequence[str] | None,
) -> _Progress:
    """Run the job from ``prepare`` to its disappearance, the guest writing in between."""
    vm = s.vm
    timer = window.timer
    timeout = s.config.step_timeout
    prepared = tuple(prepare()) if prepare is not None else ()
    vm.qmp(command, **args)
    ready_at: float | None = None
    at_complete: int | None = None
    if complete:
        ready_at = wait_ready(vm, job_id, timeout=timeout).time - timer.wall
        # the guest writes while the job mirrors its writes
        at_complete = _write_on(s, WRITES_BETWEEN)
        vm.qmp("block-job-complete", device=job_id)
    pending_at = wait_pending(vm, job_id, timeout=timeout).time - timer.wall
    at_finalize: int | None = None
    if not complete:
        # the guest writes between the job's last copy and the graph change
        at_finalize = _write_on(s, WRITES_BETWEEN)
        vm.qmp("job-finalize", id=job_id)
    wait_completed(vm, job_id, timeout=timeout)
    wait_gone(vm, job_id, timeout=timeout)
    seconds = timer.since()
    s.drain(window=0.02)
    at_end = _last(s)
    return _Progress(
        prepared=prepared,
        ready_at=ready_at,
        pending_at=pending_at,
        at_complete=at_complete,
        at_finalize=at_finalize,
        seconds=seconds,
        at_end=at_end,
        chain=_chain_after(s, job_id, expect),
    )


def _chain_after(s: Session, job_id: str, expect_chain: Sequence[str] | None) -> tuple[str, ...]:
    """The drive's chain after the job; :class:`QEMUError` if it is not ``expect_chain``."""
    chain = backing_chain(s.vm, DRIVE_ID)
    if expect_chain is not None and tuple(expect_chain) != chain:
        raise QEMUError(
            f"after job {job_id!r} the chain of {DRIVE_ID} is {list(chain)}, "
            f"not {list(expect_chain)}"
        )
    return chain


def _opens_since(s: Session, audit: int) -> tuple[BrokerOpen, ...] | None:
    """The opens the broker answered from audit record ``audit`` on; None without the hook."""
    if not s.config.hook:
        return None
    return tuple(BrokerOpen.from_record(r, s.image_dir) for r in s.audit_records()[audit:])


def _job_nodes(s: Session, arguments: Mapping[str, Any]) -> dict[str, str]:
    """The file of each node the job's arguments name (``*-node``), before it starts."""
    wanted = {str(v) for k, v in arguments.items() if k.endswith("-node")}
    return {n: f for n, f in node_files(s.vm).items() if n in wanted} if wanted else {}


def _job_run(
    s: Session,
    job_id: str,
    command: str,
    args: dict[str, Any],
    window: _Window,
    progress: _Progress,
    nodes: dict[str, str],
) -> JobRun:
    return JobRun(
        job_id=job_id,
        command=command,
        arguments=args,
        # every event read in the window: the job's, and those of the jobs prepare ran
        events=tuple(s.vm.seen[window.events :]),
        started=window.timer.wall,
        seconds=progress.seconds,
        seconds_to_ready=progress.ready_at,
        seconds_to_pending=progress.pending_at,
        opens=_opens_since(s, window.audit),
        synced_at_start=window.synced,
        synced_at_complete=progress.at_complete,
        synced_at_finalize=progress.at_finalize,
        synced_at_end=progress.at_end,
        chain_after=progress.chain,
        prepare=progress.prepared,
        nodes=nodes,
    )


def _note_done(s: Session, name: str, run: JobRun) -> None:
    rw = ", ".join(o.path for o in run.rw_opens) or "none"
    opens = run.opens
    seen = f"{len(opens)} opens (read-write: {rw})" if opens is not None else "opens not seen"
    s.note(
        name,
        True,
        run.seconds,
        f"chain {' <- '.join(reversed(run.chain_after))}; {seen}; "
        f"{run.records_during} records synced meanwhile",
    )


def run_block_job(
    s: Session,
    job_id: str,
    command: str,
    arguments: Mapping[str, Any],
    *,
    complete: bool,
    prepare: Callable[[], Sequence[str]] | None = None,
    expect_chain: Sequence[str] | None = None,
    speed: int = 0,
) -> JobRun:
    """Start a block job, wait for it by its events, and record what it did.

    ``prepare`` runs first inside the job's window (its opens count as the
    job's) and returns the commands it ran.  ``complete`` jobs wait for
    ``BLOCK_JOB_READY`` and are sent ``block-job-complete``.  With
    ``expect_chain``, the chain QEMU reports afterwards (file names, active
    first) must be that, or :class:`QEMUError` says what it is instead.
    ``speed`` (bytes/s, 0 for none) is the job's rate limit.

    A job that completes by itself runs with ``auto-finalize: false``: it
    stops in ``pending`` when its work is done, the guest writes
    :data:`WRITES_BETWEEN` more records, and only ``job-finalize`` changes
    the graph.  A ``complete`` job (mirror, active commit) is finalized by
    QEMU: from its last pass to the pivot it keeps the source drained, and a
    guest write then would wait for a ``job-finalize`` (measured: with
    ``auto-finalize: false`` the guest's writes hung in ``pending``).
    """
    name = f"job {job_id} ({command})"
    window = _Window.open(s)
    args = _job_arguments(job_id, arguments, complete=complete, speed=speed)
    nodes = _job_nodes(s, arguments)
    try:
        progress = _drive_job(
            s,
            job_id,
            command,
            args,
            window,
            complete=complete,
            prepare=prepare,
            expect=expect_chain,
        )
    except TestbedError as err:
        s.note(name, False, window.timer.since(), str(err))
        raise
    run = _job_run(s, job_id, command, args, window, progress, nodes)
    s.jobs.append(run)
    _note_done(s, name, run)
    return run


def _steps(records: int, parts: int) -> list[int]:
    """Record seqs at which to act: every tenth of the run, from the first.

    The rest (at least 60%) is left for the jobs themselves: a rate-limited
    stream or mirror of the whole disk takes about 2 s, while the guest
    writes 15 to 40 records a second.
    """
    gap = max(1, records // 10)
    return [gap * (i + 1) for i in range(parts)]


def _two_snapshots(s: Session, at: Sequence[int]) -> tuple[SnapshotMark, SnapshotMark]:
    s.wait_synced(at[0])
    first = s.snapshot("qmp")
    s.wait_synced(at[1])
    second = s.snapshot("qmp")
    return first, second


def commit_program(s: Session, records: int, speed: int) -> list[JobRun]:
    """Two snapshots, an intermediate then an active ``block-commit``."""
    assert s.disk is not None
    base = s.disk.path
    at = _steps(records, 4)
    s.start_writer(records)
    first, second = _two_snapshots(s, at)
    s.wait_synced(at[2])
    middle = run_block_job(
        s,
        "commit-mid",
        "block-commit",
        {
            "device": DRIVE_ID,
            "top-node": format_node(s.vm, first.overlay),
            "base-node": format_node(s.vm, base),
        },
        complete=False,
        speed=speed,
        expect_chain=(second.overlay.name, base.name),
    )
    s.wait_synced(at[3])
    active = run_block_job(
        s,
        "commit-top",
        "block-commit",
        {"device": DRIVE_ID},
        complete=True,
        speed=speed,
        expect_chain=(base.name,),
    )
    s.finish_writer()
    s.check_pattern()
    return [middle, active]


def stream_program(s: Session, records: int, speed: int) -> list[JobRun]:
    """Two snapshots, ``block-stream`` with ``base`` then without."""
    assert s.disk is not None
    base = s.disk.path
    at = _steps(records, 4)
    s.start_writer(records)
    _, second = _two_snapshots(s, at)
    s.wait_synced(at[2])
    partial = run_block_job(
        s,
        "stream-base",
        "block-stream",
        {"device": DRIVE_ID, "base-node": format_node(s.vm, base)},
        complete=False,
        speed=speed,
        expect_chain=(second.overlay.name, base.name),
    )
    s.wait_synced(at[3])
    whole = run_block_job(
        s,
        "stream-all",
        "block-stream",
        {"device": DRIVE_ID},
        complete=False,
        speed=speed,
        expect_chain=(second.overlay.name,),
    )
    s.finish_writer()
    s.check_pattern()
    return [partial, whole]


def _blockdev_target(s: Session, target: Path) -> Callable[[], Sequence[str]]:
    """Create and add the mirror target through the hook, the -blockdev way."""
    size = s.config.layout.size

    def prepare() -> Sequence[str]:
        vm, timeout = s.vm, s.config.step_timeout
        run_create_job(
            vm,
            "create-file",
            {"driver": "file", "filename": str(target), "size": 0},
            timeout=timeout,
        )
        vm.qmp(
            "blockdev-add", driver="file", filename=str(target), **{"node-name": MIRROR_FILE_NODE}
        )
        run_create_job(
            vm,
            "create-qcow2",
            {"driver": "qcow2", "file": MIRROR_FILE_NODE, "size": size},
            timeout=timeout,
        )
        vm.qmp("blockdev-add", driver="qcow2", file=MIRROR_FILE_NODE, **{"node-name": MIRROR_NODE})
        return (
            "blockdev-create file",
            f"blockdev-add file {MIRROR_FILE_NODE}",
            "blockdev-create qcow2",
            f"blockdev-add qcow2 {MIRROR_NODE}",
        )

    return prepare


def mirror_program(s: Session, records: int, via: MirrorVia, speed: int) -> list[JobRun]:
    """A full mirror to a new qcow2 target, pivoted while the guest writes."""
    target = s.image_dir / MIRROR_TARGET
    s.start_writer(records)
    s.wait_synced(_steps(records, 1)[0])
    if via is MirrorVia.DRIVE:
        args: dict[str, Any] = {
            "device": DRIVE_ID,
            "target": str(target),
            "format": "qcow2",
            "sync": "full",
            "mode": "absolute-paths",
        }
        job = run_block_job(
            s,
            "mirror",
            "drive-mirror",
            args,
            complete=True,
            expect_chain=(target.name,),
            speed=speed,
        )
    else:
        args = {"device": DRIVE_ID, "target": MIRROR_NODE, "sync": "full"}
        job = run_block_job(
            s,
            "mirror",
            "blockdev-mirror",
            args,
            complete=True,
            speed=speed,
            prepare=_blockdev_target(s, target),
            expect_chain=(target.name,),
        )
    s.finish_writer()
    s.check_pattern()
    return [job]


def run_program(
    s: Session, kind: JobKind, records: int, via: MirrorVia, speed: int = DEFAULT_SPEED
) -> list[JobRun]:
    """Run the program for ``kind``; the jobs it ran are also in ``s.jobs``."""
    if kind is JobKind.COMMIT:
        return commit_program(s, records, speed)
    if kind is JobKind.STREAM:
        return stream_program(s, records, speed)
    return mirror_program(s, records, via, speed)


# -- after power-off ----------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MirrorCheck:
    """Source against target after a pivoted mirror."""

    #: source and target up to the first record the source does not have
    prefix: Compare
    whole: Compare
    #: the first byte where they must differ (None: the guest wrote nothing after the pivot)
    expected_mismatch: int | None

    def to_json(self) -> dict[str, object]:
        return {
            "prefix": self.prefix.to_json(),
            "whole": self.whole.to_json(),
            "expected_mismatch": self.expected_mismatch,
        }


@dataclass(frozen=True, kw_only=True)
class JobVerdict:
    """What :func:`verify_job` found."""

    final_image: Path
    report: ChainReport
    mirror: MirrorCheck | None = None


def has_backing_file(path: Path) -> bool:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        raise TestbedError(f"qemu-img info {path}: {out.stderr.strip()}")
    info = json.loads(out.stdout)
    return "backing-filename" in info


def _check_pattern(s: Session, path: Path, fmt: str) -> list[str]:
    layout = s.config.layout
    length = layout.pattern_sectors * SECTOR
    if read_raw(path, fmt)[:length] != pattern_bytes(s.run, length):
        return [f"{path.name}: the host's pattern is not in the first {length} bytes"]
    return []


def verify_job(s: Session, kind: JobKind, jobs: Sequence[JobRun]) -> JobVerdict:
    """After power-off: the image the job left holds every synced record (see module doc)."""
    assert s.disk is not None
    disk, fmt = s.disk.path, s.disk.fmt
    problems: list[str] = []
    mirror: MirrorCheck | None = None
    if kind is JobKind.COMMIT:
        final, final_fmt = disk, fmt
        report = s.verify(marks=[])
    elif kind is JobKind.STREAM:
        final, final_fmt = s.marks[-1].overlay, "qcow2"
        if has_backing_file(final):
            problems.append(f"{final.name} still names a backing file after block-stream")
        # the top of the old chain is snap2 with no backing now; disk and snap1 are untouched
        report = s.verify()
    else:
        final, final_fmt = s.image_dir / MIRROR_TARGET, "qcow2"
        job = jobs[-1]
        # what was synced before block-job-complete went to the source; the
        # pivot is done when the job is gone
        assert job.synced_at_complete is not None
        mark = SnapshotMark(
            overlay=final, synced_before=job.synced_at_complete, synced_after=job.synced_at_end
        )
        if has_backing_file(final):
            problems.append(f"{final.name}: a sync=full mirror target names a backing file")
        report = s.verify(marks=[mark])
        t0 = time.monotonic()
        mirror = check_mirror(s, disk, fmt, final)
        found = mirror_problems(mirror)
        s.note(
            "compare",
            not found,
            time.monotonic() - t0,
            f"identical up to byte {mirror.prefix.length}; whole: {mirror.whole.output}",
        )
        problems += found
    problems += _check_pattern(s, final, final_fmt)
    if problems:
        raise VerifyError(problems)
    return JobVerdict(final_image=final, report=report, mirror=mirror)


def check_mirror(s: Session, source: Path, fmt: str, target: Path) -> MirrorCheck:
    """Compare source and target: equal up to the pivot, different from there."""
    layout = s.config.layout
    src = scan(read_raw(source, fmt), layout, s.run)
    dst = scan(read_raw(target, "qcow2"), layout, s.run)
    after = sorted(dst.seqs - src.seqs)
    first_new = max(src.seqs) + 1 if src.seqs else 0
    prefix_len = (layout.record_start + first_new) * SECTOR
    prefix = qemu_img_compare(source, fmt, target, "qcow2", length=prefix_len)
    whole = qemu_img_compare(source, fmt, target, "qcow2")
    expected = (layout.record_start + after[0]) * SECTOR if after else None
    return MirrorCheck(prefix=prefix, whole=whole, expected_mismatch=expected)


def mirror_problems(check: MirrorCheck) -> list[str]:
    problems = []
    if not check.prefix.identical:
        problems.append(f"source and mirror target differ before the pivot: {check.prefix.output}")
    if check.expected_mismatch is None:
        if not check.whole.identical:
            problems.append(
                f"nothing was written after the pivot, yet source and target differ: "
                f"{check.whole.output}"
            )
    elif check.whole.mismatch_at != check.expected_mismatch:
        problems.append(
            f"source and target should first differ at byte {check.expected_mismatch} "
            f"(the first record after the pivot), qemu-img compare says: {check.whole.output}"
        )
    return problems
