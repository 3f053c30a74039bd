"""Block jobs run live under the guest: commit, stream, mirror.

Each job is started with its QMP command and waited for by its events:
``BLOCK_JOB_READY`` (for the jobs that need ``block-job-complete``), then
``BLOCK_JOB_COMPLETED``, then the ``JOB_STATUS_CHANGE`` to ``null`` that
says the job is gone.  Every wait has a timeout that names the job.  While
it runs, the guest keeps writing records; the broker's audit log, read
before and after, gives the opens the job made, with their flags.

The programs (what each ``testbed boot --job`` does) are in
:mod:`testbed.guest.jobrun`; this module holds the pieces.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from testbed.broker import AuditRecord
from testbed.errors import GuestUsageError, QEMUError, TestbedError
from testbed.guest.events import EventMachine, EventPattern, QMPEvent


class JobKind(StrEnum):
    """What ``testbed boot --job`` runs."""

    COMMIT = "commit"
    STREAM = "stream"
    MIRROR = "mirror"


class MirrorVia(StrEnum):
    """The two QMP commands that start a mirror."""

    DRIVE = "drive-mirror"
    BLOCKDEV = "blockdev-mirror"


@dataclass(frozen=True, kw_only=True)
class BrokerOpen:
    """One request the broker answered, the path relative to the image directory."""

    path: str
    flags: tuple[str, ...]
    mode: int
    result: int

    @classmethod
    def from_record(cls, record: AuditRecord, image_dir: Path) -> BrokerOpen:
        path = record.path
        prefix = f"{image_dir}/"
        if path.startswith(prefix):
            path = path[len(prefix) :]
        return cls(path=path, flags=record.flag_names, mode=record.mode, result=record.result)

    @property
    def writable(self) -> bool:
        return "O_RDWR" in self.flags or "O_WRONLY" in self.flags

    def to_json(self) -> dict[str, object]:
        return {
            "path": self.path,
            "flags": "|".join(self.flags),
            "mode": oct(self.mode),
            "result": self.result,
        }

    def __str__(self) -> str:
        return f"{self.path} {'|'.join(self.flags)} -> {self.result}"


@dataclass(frozen=True, kw_only=True)
class JobRun:
    """One block job as it ran: command, events, timings, opens, records.

    Times are seconds since the job's first command was sent.  ``opens`` is
    None without the hook (nobody sees what QEMU opens then).
    ``synced_*`` are the highest record seq the guest had reported synced
    (-1 for none) when the job was started, when ``block-job-complete`` was
    sent (jobs that need it), when ``job-finalize`` was sent (jobs that
    finalize by themselves otherwise; the graph changes then) and when the
    job was gone.
    """

    job_id: str
    command: str
    arguments: Mapping[str, Any]
    events: tuple[QMPEvent, ...]
    started: float
    seconds: float
    seconds_to_ready: float | None
    seconds_to_pending: float
    opens: tuple[BrokerOpen, ...] | None
    synced_at_start: int
    synced_at_complete: int | None
    synced_at_finalize: int | None
    synced_at_end: int
    chain_after: tuple[str, ...]
    prepare: tuple[str, ...] = ()
    #: the file behind each node name in ``arguments``
    nodes: Mapping[str, str] = field(default_factory=dict)

    @property
    def records_during(self) -> int:
        """Records the guest reported synced while the job ran."""
        return max(0, self.synced_at_end - self.synced_at_start)

    @property
    def rw_opens(self) -> tuple[BrokerOpen, ...]:
        return tuple(o for o in self.opens or () if o.writable and o.result >= 0)

    def to_json(self) -> dict[str, object]:
        return {
            "job_id": self.job_id,
            "command": self.command,
            "arguments": dict(self.arguments),
            "nodes": dict(self.nodes),
            "prepare": list(self.prepare),
            "seconds": round(self.seconds, 3),
            "seconds_to_ready": (
                round(self.seconds_to_ready, 3) if self.seconds_to_ready is not None else None
            ),
            "seconds_to_pending": round(self.seconds_to_pending, 3),
            "events": [e.to_json(since=self.started) for e in self.events],
            "opens": [o.to_json() for o in self.opens] if self.opens is not None else None,
            "opens_count": len(self.opens) if self.opens is not None else None,
            "rw_opens": [o.to_json() for o in self.rw_opens],
            "synced_at_start": self.synced_at_start,
            "synced_at_complete": self.synced_at_complete,
            "synced_at_finalize": self.synced_at_finalize,
            "synced_at_end": self.synced_at_end,
            "records_during": self.records_during,
            "chain_after": list(self.chain_after),
        }


def _failed(job_id: str) -> list[EventPattern]:
    """Events that mean block job ``job_id`` will not get where a wait wants it."""
    return [
        EventPattern(name="BLOCK_JOB_CANCELLED", data={"device": job_id}),
        EventPattern(name="BLOCK_JOB_ERROR", data={"device": job_id}),
        EventPattern(name="JOB_STATUS_CHANGE", data={"id": job_id, "status": "aborting"}),
    ]


def wait_ready(vm: EventMachine, job_id: str, *, timeout: float) -> QMPEvent:
    """``BLOCK_JOB_READY``: a mirror-like job has copied everything and mirrors writes."""
    return vm.wait_event(
        EventPattern(name="BLOCK_JOB_READY", data={"device": job_id}),
        timeout=timeout,
        what=f"block job {job_id!r} to become ready",
        fail=[*_failed(job_id), EventPattern(name="BLOCK_JOB_COMPLETED", data={"device": job_id})],
    )


def wait_pending(vm: EventMachine, job_id: str, *, timeout: float) -> QMPEvent:
    """The ``JOB_STATUS_CHANGE`` to ``pending``: work done, waiting for ``job-finalize``."""
    return vm.wait_event(
        EventPattern(name="JOB_STATUS_CHANGE", data={"id": job_id, "status": "pending"}),
        timeout=timeout,
        what=f"block job {job_id!r} to finish its work (status pending)",
        fail=_failed(job_id),
    )


def wait_completed(vm: EventMachine, job_id: str, *, timeout: float) -> QMPEvent:
    """``BLOCK_JOB_COMPLETED``; one carrying an ``error`` raises :class:`QEMUError`."""
    done = vm.wait_event(
        EventPattern(name="BLOCK_JOB_COMPLETED", data={"device": job_id}),
        timeout=timeout,
        what=f"block job {job_id!r} to complete",
        fail=_failed(job_id),
    )
    if "error" in done.data:
        raise QEMUError(f"block job {job_id!r} failed: {done.data['error']}")
    return done


def wait_gone(vm: EventMachine, job_id: str, *, timeout: float) -> QMPEvent:
    """The ``JOB_STATUS_CHANGE`` to ``null``: the job is dismissed."""
    return vm.wait_event(
        EventPattern(name="JOB_STATUS_CHANGE", data={"id": job_id, "status": "null"}),
        timeout=timeout,
        what=f"job {job_id!r} to be dismissed",
    )


def run_create_job(
    vm: EventMachine, job_id: str, options: Mapping[str, Any], *, timeout: float
) -> None:
    """``blockdev-create`` (a job that is not a block job): wait, check, dismiss."""
    vm.qmp("blockdev-create", **{"job-id": job_id, "options": dict(options)})
    vm.wait_event(
        EventPattern(name="JOB_STATUS_CHANGE", data={"id": job_id, "status": "concluded"}),
        timeout=timeout,
        what=f"job {job_id!r} (blockdev-create {options.get('driver')}) to conclude",
    )
    jobs = vm.qmp("query-jobs")
    for job in jobs:
        if job.get("id") == job_id and job.get("error"):
            vm.qmp("job-dismiss", id=job_id)
            raise QEMUError(f"job {job_id!r} (blockdev-create) failed: {job['error']}")
    vm.qmp("job-dismiss", id=job_id)
    wait_gone(vm, job_id, timeout=timeout)


#: Protocol drivers: their nodes sit under a format node with the same file name.
_PROTOCOL_DRIVERS = frozenset({"file", "host_device", "host_cdrom"})


def format_node(vm: EventMachine, path: Path) -> str:
    """The node name of the format node QEMU opened ``path`` as.

    Jobs are given node names (``top-node``, ``base-node``), not file names:
    QEMU looks a file name up with realpath(), which does not go through the
    hook and fails where the image directory is hidden (measured:
    ``Top image file .../snap1.qcow2 not found`` under ``--sandbox``).
    """
    for node in vm.qmp("query-named-block-nodes"):
        if node.get("file") == str(path) and node.get("drv") not in _PROTOCOL_DRIVERS:
            return str(node["node-name"])
    raise QEMUError(f"query-named-block-nodes has no format node for {path}")


def node_files(vm: EventMachine) -> dict[str, str]:
    """Node name -> the file name (no directory) of every named node."""
    return {
        str(n["node-name"]): Path(str(n.get("file", "?"))).name
        for n in vm.qmp("query-named-block-nodes")
        if n.get("node-name")
    }


def backing_chain(vm: EventMachine, device: str) -> tuple[str, ...]:
    """The file names of ``device``'s chain, active layer first (from ``query-block``)."""
    for dev in vm.qmp("query-block"):
        if dev.get("device") != device:
            continue
        image = (dev.get("inserted") or {}).get("image")
        names: list[str] = []
        while image:
            names.append(Path(str(image.get("filename", "?"))).name)
            image = image.get("backing-image")
        return tuple(names)
    raise QEMUError(f"query-block has no device {device!r}")


@dataclass(frozen=True, kw_only=True)
class Compare:
    """What ``qemu-img compare`` said about two images (or prefixes of them)."""

    identical: bool
    #: first differing byte, when qemu-img names it
    mismatch_at: int | None
    argv: tuple[str, ...]
    output: str
    length: int | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "identical": self.identical,
            "mismatch_at": self.mismatch_at,
            "length": self.length,
            "command": " ".join(self.argv),
            "output": self.output,
        }


_MISMATCH = re.compile(r"Content mismatch at offset (\d+)")


def _spec(path: Path, fmt: str, length: int | None) -> str:
    node: dict[str, Any] = {"driver": fmt, "file": {"driver": "file", "filename": str(path)}}
    if length is not None:
        # the raw driver's offset/size view: compare only the first ``length`` bytes
        node = {"driver": "raw", "size": length, "file": node}
    return "json:" + json.dumps(node)


def qemu_img_compare(
    a: Path, a_fmt: str, b: Path, b_fmt: str, *, length: int | None = None
) -> Compare:
    """``qemu-img compare`` of the guest-visible contents of two images.

    With ``length`` (a multiple of 512), only the first ``length`` bytes of
    each are compared.
    """
    if length is not None and (length <= 0 or length % 512):
        raise GuestUsageError(f"compare length {length} is not a positive multiple of 512")
    argv = ("qemu-img", "compare", "-U", _spec(a, a_fmt, length), _spec(b, b_fmt, length))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as err:
        raise TestbedError(f"qemu-img compare {a.name} {b.name}: {err}") from err
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode not in (0, 1):
        raise TestbedError(f"qemu-img compare {a.name} {b.name} failed: {out}")
    m = _MISMATCH.search(out)
    return Compare(
        identical=proc.returncode == 0,
        mismatch_at=int(m.group(1)) if m else None,
        argv=argv,
        output=out,
        length=length,
    )


@dataclass(frozen=True, kw_only=True)
class JobTimer:
    """Wall and monotonic start of a job, for event offsets and durations."""

    wall: float = field(default_factory=time.time)
    mono: float = field(default_factory=time.monotonic)

    def since(self) -> float:
        return time.monotonic() - self.mono
