"""Block jobs as far as they open files: commit, stream, mirror, backup.

What each job opens, reopens and closes, in QEMU 7.2's order (every point
from ``strace`` of Debian's ``qemu-system-x86_64``; ``tests/block/test_jobs.py``):

* ``block-commit`` of an intermediate layer (``top`` below the active
  layer): the base is reopened read-write when the job starts
  (``bdrv_reopen_set_read_only(base, false)``: its file ``O_RDWR``), and
  back to read-only when it ends; the layers from ``top`` down to just
  above the base leave the chain and close (they were read-only: no open).
* ``block-commit`` of the active layer (a mirror job inside QEMU): the base
  is reopened read-write at start and stays so; the job is ``ready`` at
  once and waits for ``block-job-complete``, which pivots the device onto
  the base: the old active layer drops its write permission (auto-read-only
  files reopen ``O_RDONLY``) and closes with everything above the base.
* ``block-stream``: nothing is opened; at the end the layers above ``base``
  (or all of them) leave the chain and close.
* ``drive-mirror``: the target is created like a snapshot overlay (two
  ENOENT probes, ``O_RDWR|O_CREAT`` 0644, probe + ``O_RDWR`` for the qcow2
  header; backing: none for ``sync=full``, the source's backing for
  ``top``, the source for ``none``), opened without its backing like the
  source (probe, ``O_RDONLY``, then ``O_RDWR`` as the job takes write);
  ``block-job-complete`` pivots the device onto the target (the old top
  reopens read-only and closes, or stays as the target's backing for
  ``sync=none``); ``block-job-cancel`` drops the target (``O_RDONLY``, close).
* ``drive-backup``: the target is created and opened the same way; at the
  end it reopens read-only and closes.  The source is not reopened.
* ``blockdev-mirror`` / ``blockdev-backup``: the target is a node added
  before (``blockdev-add``); nothing is opened.

The model moves no data: a job changes the graph and the descriptors as
QEMU does, and the bytes a guest reads afterwards are not recomputed (a
commit's base or a stream's top keeps its old contents in the model).
Jobs run to completion at once; their QMP events are recorded in order on
:attr:`testbed.block.layer.BlockLayer.events`, where a scenario's ``wait``
finds them.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from testbed.block.nodes import FileNode, FormatNode
from testbed.errors import BlockError

if TYPE_CHECKING:
    from testbed.block.layer import BlockLayer, Drive


class JobType(enum.StrEnum):
    COMMIT = "commit"
    STREAM = "stream"
    MIRROR = "mirror"
    BACKUP = "backup"


class JobStatus(enum.StrEnum):
    """QEMU's ``JobStatus`` (the states a model job passes through)."""

    CREATED = "created"
    RUNNING = "running"
    READY = "ready"
    CONCLUDED = "concluded"
    NULL = "null"


#: The transitions a model job may take (QEMU's ``JobSTT``, the states above only).
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.CREATED: frozenset({JobStatus.RUNNING}),
    JobStatus.RUNNING: frozenset({JobStatus.READY, JobStatus.CONCLUDED}),
    JobStatus.READY: frozenset({JobStatus.CONCLUDED}),
    JobStatus.CONCLUDED: frozenset({JobStatus.NULL}),
    JobStatus.NULL: frozenset(),
}


class Sync(enum.StrEnum):
    FULL = "full"
    TOP = "top"
    NONE = "none"


@dataclass(eq=False)
class Job:
    id: str
    type: JobType
    drive: Drive
    status: JobStatus = JobStatus.CREATED
    #: The node the job writes (commit's base, a mirror/backup target).
    target: FormatNode | None = None
    #: Commit/stream: the lowest layer that stays (None: stream everything).
    base: FormatNode | None = None
    #: Commit: the highest layer committed; mirror: the source top.
    top: FormatNode | None = None
    sync: Sync = Sync.FULL
    base_was_read_only: bool = False
    #: Mirror: pivot on complete (drive-mirror, blockdev-mirror, active commit).
    pivots: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def move(self, layer: BlockLayer, status: JobStatus) -> None:
        if status not in TRANSITIONS[self.status]:
            raise BlockError(f"job {self.id!r}: cannot go from {self.status} to {status}")
        self.status = status
        layer.emit("JOB_STATUS_CHANGE", {"id": self.id, "status": str(status)})

    def event_data(self) -> dict[str, Any]:
        return {"device": self.id, "type": str(self.type), "speed": 0}


class JobManager:
    """The jobs of one :class:`BlockLayer`: start, complete, cancel, and their events."""

    def __init__(self, layer: BlockLayer) -> None:
        self.layer = layer
        self.jobs: dict[str, Job] = {}
        layer.extra_users.append(self._held)
        layer.quit_hooks.append(self._cancel_all)

    def _held(self) -> list[FormatNode]:
        return [n for j in self.jobs.values() for n in (j.target, j.base, j.top) if n is not None]

    def _new(self, job_id: str | None, job_type: JobType, device: str) -> Job:
        drive = self.layer.drive_or_node(device)
        name = job_id or device
        if name in self.jobs:
            raise BlockError(f"Job ID '{name}' already in use")
        if any(j.drive is drive for j in self.jobs.values()):
            raise BlockError(f"Node '{device}' is busy: block device is in use by block job")
        job = Job(id=name, type=job_type, drive=drive)
        self.jobs[name] = job
        job.move(self.layer, JobStatus.RUNNING)
        return job

    def get(self, job_id: str) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise BlockError(f"Block job '{job_id}' not found") from None

    # -- commit -----------------------------------------------------------------

    def commit(
        self,
        device: str,
        *,
        job_id: str | None = None,
        top: str | None = None,
        base: str | None = None,
        backing_file: str | None = None,
    ) -> Job:
        drive = self.layer.drive_or_node(device)
        chain = drive.top.chain()
        top_node = _find(chain, top, "top") if top else chain[0]
        below = chain[chain.index(top_node) + 1 :]
        if not below:
            raise BlockError(f"Top image file {top_node.filename} has no backing file to commit to")
        base_node = _find(below, base, "base") if base else below[-1]
        job = self._new(job_id, JobType.COMMIT, device)
        job.top, job.base, job.target = top_node, base_node, base_node
        job.extra["backing_file"] = backing_file
        job.base_was_read_only = base_node.read_only
        _make_writable(base_node)
        if top_node is drive.top:
            job.pivots = True
            self._ready(job)
        else:
            self._finish_commit(job)
        return job

    def _finish_commit(self, job: Job) -> None:
        assert job.top is not None and job.base is not None
        chain = job.drive.top.chain()
        overlay = chain[chain.index(job.top) - 1]
        job.top = None  # the committed layers are no longer the job's
        _drop_between(self.layer, overlay, job.base)
        job.base.writers -= 1
        if job.base_was_read_only:
            job.base.read_only = True
            for child in job.base.children():
                child.node.make_read_only()
        else:
            job.base.refresh_perms()
        self._conclude(job)

    # -- stream -----------------------------------------------------------------

    def stream(self, device: str, *, job_id: str | None = None, base: str | None = None) -> Job:
        drive = self.layer.drive_or_node(device)
        chain = drive.top.chain()
        base_node = _find(chain[1:], base, "base") if base else None
        job = self._new(job_id, JobType.STREAM, device)
        job.base = base_node
        top = drive.top
        if base_node is None:
            lowest = chain[-1]
            top.backing = None
            if lowest is not top:
                _close_chain(self.layer, chain[1:])
        else:
            _drop_between(self.layer, top, base_node)
        self._conclude(job)
        return job

    # -- mirror and backup ----------------------------------------------------------

    def mirror(
        self,
        device: str,
        *,
        job_id: str | None = None,
        target: str,
        sync: str,
        fmt: str | None = None,
        mode: str = "absolute-paths",
        node_target: bool = False,
    ) -> Job:
        job = self._start_copy(JobType.MIRROR, device, job_id, target, sync, fmt, mode,
                               node_target=node_target, backing_unless_none=False)  # fmt: skip
        job.pivots = True
        self._ready(job)
        return job

    def backup(
        self,
        device: str,
        *,
        job_id: str | None = None,
        target: str,
        sync: str,
        fmt: str | None = None,
        mode: str = "absolute-paths",
        node_target: bool = False,
    ) -> Job:
        # drive-backup keeps BDRV_O_NO_BACKING for sync=none only
        job = self._start_copy(JobType.BACKUP, device, job_id, target, sync, fmt, mode,
                               node_target=node_target, backing_unless_none=True)  # fmt: skip
        target_node = job.target
        assert target_node is not None
        target_node.writers -= 1
        if not node_target:
            self.layer.close_node(target_node)
        else:
            target_node.refresh_perms()
        job.target = None
        self._conclude(job)
        return job

    def _start_copy(
        self, kind: JobType, device: str, job_id: str | None, target: str, sync: str,
        fmt: str | None, mode: str, *, node_target: bool, backing_unless_none: bool,
    ) -> Job:  # fmt: skip
        """What mirror and backup share: the target opened (or found) and written to.

        ``backing_unless_none``: a target opened here keeps its backing file
        unless ``sync`` is none (backup); else it never does (mirror).
        """
        drive = self.layer.drive_or_node(device)
        how = _sync(sync)
        backing = backing_unless_none and how is not Sync.NONE
        target_node = (
            self.layer.drive_or_node(target).top
            if node_target
            else self._open_target(drive, target, fmt, how, mode, with_backing=backing)
        )
        job = self._new(job_id, kind, device)
        job.top, job.target, job.sync = drive.top, target_node, how
        target_node.writers += 1
        target_node.refresh_perms()
        return job

    def _open_target(
        self,
        drive: Drive,
        target: str,
        fmt: str | None,
        how: Sync,
        mode: str,
        *,
        with_backing: bool = False,
    ) -> FormatNode:
        """``drive-mirror``/``drive-backup``: create (unless ``existing``) and open the target."""
        from testbed.block.layer import OpenOptions

        source = drive.top
        fmt = fmt or source.driver
        if mode not in ("absolute-paths", "existing"):
            raise BlockError(f"mode {mode!r} is not absolute-paths or existing")
        if mode == "absolute-paths":
            backing = {Sync.FULL: None, Sync.TOP: source.backing, Sync.NONE: source}[how]
            create_image_file(
                self.layer, target, fmt, source.virtual_size, backing, open_backing=with_backing
            )
        opts = OpenOptions(
            read_only=False,
            auto_read_only=source.auto_read_only,
            cache_direct=source.cache_direct,
        )
        return self.layer.open_image(
            target,
            fmt=fmt,
            probe=True,
            opts=opts,
            node_name=f"{drive.id}-target",
            no_backing=not with_backing,
        )

    # -- ready jobs -------------------------------------------------------------------

    def complete(self, job_id: str) -> None:
        """``block-job-complete``: a ready mirror (or active commit) pivots."""
        job = self.get(job_id)
        if job.status is not JobStatus.READY:
            raise BlockError(
                f"The active block job '{job_id}' cannot be completed (it is {job.status})"
            )
        if job.type is JobType.COMMIT:
            self._pivot_commit(job)
        else:
            self._pivot_mirror(job)
        self._conclude(job)

    def cancel(self, job_id: str, *, force: bool = False) -> None:
        """``block-job-cancel``: a ready mirror ends without pivoting (and still 'completes')."""
        job = self.get(job_id)
        if job.status not in (JobStatus.RUNNING, JobStatus.READY):
            raise BlockError(f"Job '{job_id}' is {job.status} and cannot be cancelled")
        target = job.target
        if job.type is JobType.MIRROR and target is not None:
            target.writers -= 1
            job.target = None
            if not self.layer.is_named(target):
                self.layer.close_node(target)
            else:
                target.refresh_perms()
        elif job.type is JobType.COMMIT and job.base is not None:
            job.base.writers -= 1
            job.base.refresh_perms()
        self._conclude(job, cancelled=job.status is not JobStatus.READY)

    def _pivot_commit(self, job: Job) -> None:
        assert job.base is not None
        drive, base, old = job.drive, job.base, job.drive.top
        base.writers += old.writers - 1
        old.writers = 0
        drive.top = base
        chain = old.chain()
        above_base = chain[chain.index(base) - 1]
        above_base.backing = None
        job.top = None
        _close_chain(self.layer, chain[: chain.index(base)])

    def _pivot_mirror(self, job: Job) -> None:
        assert job.target is not None
        drive, target, old = job.drive, job.target, job.drive.top
        target.writers += old.writers - 1
        old.writers = 0
        drive.top = target
        job.top = job.target = None
        if job.sync is Sync.NONE:
            target.backing = old
            old.read_only = True
            # QEMU 7.2 reopens the old top read-only at the pivot; 10.0 leaves
            # its read-write fd until quit drops the chain, top down (strace
            # of stock 10.0: mirror.qcow2 O_RDONLY comes before top.qcow2's).
            if self.layer.qemu_at_least("10.0"):
                self.layer.read_write_until_quit.append(old)
            else:
                for child in old.children():
                    child.node.make_read_only()
        else:
            if job.sync is Sync.TOP:
                target.backing = old.backing
                old.backing = None
            if not self.layer.is_named(old):
                self.layer.close_node(old)
            else:
                old.refresh_perms()
        target.refresh_perms()

    def _ready(self, job: Job) -> None:
        job.move(self.layer, JobStatus.READY)
        self.layer.emit("BLOCK_JOB_READY", job.event_data())

    def _conclude(self, job: Job, *, cancelled: bool = False) -> None:
        job.move(self.layer, JobStatus.CONCLUDED)
        event = "BLOCK_JOB_CANCELLED" if cancelled else "BLOCK_JOB_COMPLETED"
        self.layer.emit(event, job.event_data())
        job.move(self.layer, JobStatus.NULL)  # auto-dismiss
        del self.jobs[job.id]

    def _cancel_all(self) -> None:
        for job_id in list(self.jobs):
            self.cancel(job_id, force=True)

    def query(self) -> list[dict[str, Any]]:
        return [
            {
                "device": j.id,
                "type": str(j.type),
                "status": str(j.status),
                "ready": j.status == "ready",
            }
            for j in self.jobs.values()
        ]


def _sync(sync: str) -> Sync:
    try:
        return Sync(sync)
    except ValueError:
        raise BlockError(
            f"sync {sync!r} is not one of {', '.join(s.value for s in Sync)} (in the model)"
        ) from None


def _find(chain: list[FormatNode], name: str, what: str) -> FormatNode:
    """A layer by file name (QEMU's deprecated ``top``/``base``) or node name."""
    for node in chain:
        if name in (node.filename, node.node_name):
            return node
    real = os.path.realpath(name)
    for node in chain:
        if os.path.realpath(node.filename) == real:
            return node
    raise BlockError(f"Can't find '{name}' to use as {what} in the backing chain")


def _make_writable(node: FormatNode) -> None:
    """``bdrv_reopen_set_read_only(node, false)`` plus the job's write permission.

    The explicit reopen clears auto-read-only: once a job made the base
    read-write, nothing makes it read-only again by itself (strace: no
    ``O_RDONLY`` at quit after an active commit).
    """
    node.read_only = False
    node.auto_read_only = False
    for child in node.children():
        if isinstance(child.node, FileNode):
            child.node.read_only = False
            child.node.auto_read_only = False
    node.writers += 1
    node.refresh_perms()


def _drop_between(layer: BlockLayer, overlay: FormatNode, base: FormatNode) -> None:
    """``overlay``'s backing becomes ``base``; the layers in between close."""
    chain = overlay.chain()
    dropped = chain[1 : chain.index(base)]
    if not dropped:
        return
    overlay.backing = base
    dropped[-1].backing = None
    _close_chain(layer, dropped)


def _close_chain(layer: BlockLayer, nodes: list[FormatNode]) -> None:
    if nodes:
        layer.close_node(nodes[0])


def create_image_file(
    layer: BlockLayer,
    path: str,
    fmt: str,
    size: int,
    backing: FormatNode | None,
    *,
    open_backing: bool = False,
) -> None:
    """``bdrv_img_create`` for a job's target: qcow2 (with a backing name) or raw.

    Without ``BDRV_O_NO_BACKING`` (``open_backing``: drive-backup, unlike
    drive-mirror and snapshots) ``bdrv_img_create`` opens the backing file
    and its chain read-only once to check it, between its own protocol
    probe and ``bdrv_create_file``'s.
    """
    from testbed.block import formats
    from testbed.block.driver import FdFile
    from testbed.block.layer import OpenOptions

    creators = sorted(n for n, d in formats.all_drivers().items() if d.creates_targets)
    if fmt not in creators:
        raise BlockError(f"the model creates {' and '.join(creators)} targets only, not {fmt!r}")
    driver = formats.get_driver(fmt)
    opener = layer.opener
    # bdrv_img_create and bdrv_create_file each call bdrv_find_protocol.
    opener.probe(path)
    if open_backing and backing is not None:
        opts = OpenOptions(read_only=True, auto_read_only=False, cache_direct=False)
        check = layer.open_image(
            backing.filename, fmt=backing.driver, probe=True, opts=opts, node_name="img-create"
        )
        layer.close_node(check)
    opener.probe(path)
    fd = opener.qemu_create(path, os.O_RDWR, 0o644)
    try:
        os.ftruncate(fd, size if driver.bare else 0)
    finally:
        os.close(fd)
    if driver.bare:
        return
    opener.probe(path)
    fd = opener.qemu_open(path, os.O_RDWR)
    try:
        driver.create(
            FdFile(fd, path),
            size=size,
            backing_file=backing.filename if backing is not None else None,
            backing_format=backing.driver if backing is not None else None,
        )
    finally:
        os.close(fd)
