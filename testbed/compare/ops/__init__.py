"""The operation vocabulary: what a scenario does to its image, one module per operation.

An :class:`Operation` turns a :class:`OpContext` (how the image is attached)
into the :class:`~testbed.compare.steps.Step` list every oracle runs, and
may add set-up (a target image made with ``qemu-img``), a machine type, or
a QEMU option it needs.  :data:`REGISTRY` holds one entry per :class:`Op`;
adding an operation is one module here plus one line in :func:`_load`.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from testbed.compare.steps import Step
from testbed.errors import RegistryError, UnknownOperationError


class Op(enum.StrEnum):
    ADD = "add"
    DEL = "del"
    READ = "read"
    SNAPSHOT_QMP = "snapshot-qmp"
    SNAPSHOT_HMP = "snapshot-hmp"
    SNAPSHOT_EXISTING = "snapshot-existing"
    COMMIT = "commit"
    COMMIT_BACKING_FILE = "commit-backing-file"
    COMMIT_ACTIVE = "commit-active"
    STREAM = "stream"
    STREAM_BASE = "stream-base"
    MIRROR_FULL = "mirror-full"
    MIRROR_TOP = "mirror-top"
    MIRROR_NONE = "mirror-none"
    MIRROR_CANCEL = "mirror-cancel"
    BLOCKDEV_MIRROR = "blockdev-mirror"
    BACKUP = "backup"
    BACKUP_TOP = "backup-top"
    BLOCKDEV_BACKUP = "blockdev-backup"
    REOPEN_RW = "reopen-rw"
    REOPEN_DIRECT = "reopen-direct"
    CHANGE_MEDIUM = "change-medium"
    TRAY = "tray"
    BROKER_RESTART = "broker-restart"
    QUIT = "quit"


@dataclass(frozen=True, kw_only=True)
class OpContext:
    """What an operation needs to know about the scenario it is in."""

    #: ``drive``, ``drive-device``, ``blockdev``, ``hotplug``, ``cdrom``, ``file-node``.
    attach: str
    #: The QEMU name of the image's second layer (an intermediate commit's top), if any.
    mid: str = ""
    #: The QEMU name of the image's lowest layer.
    bottom: str = ""
    #: The lowest layer's name as its overlay stores it (a commit's ``backing-file``).
    backing_name: str = ""
    read_only: bool = False
    cache_direct: bool = False

    @property
    def selector(self) -> dict[str, str]:
        """``device`` for a -drive's BlockBackend, ``node-name`` for a named node."""
        if self.attach in ("drive", "drive-device"):
            return {"device": "drive0"}
        return {"node-name": "drive0"}


@dataclass(frozen=True, kw_only=True)
class Operation:
    name: Op
    summary: str
    steps: Callable[[OpContext], tuple[Step, ...]]
    #: Shell commands run in the scenario directory before QEMU starts.
    recipe: tuple[str, ...] = ()
    #: Which attaches the operation makes sense with (empty: any).
    attaches: frozenset[str] = field(default_factory=frozenset)


REGISTRY: dict[Op, Operation] = {}


def register(op: Operation) -> Operation:
    if op.name in REGISTRY:
        raise RegistryError(f"operation {op.name} registered twice")
    REGISTRY[op.name] = op
    return op


def get(name: str) -> Operation:
    _load()
    try:
        return REGISTRY[Op(name)]
    except ValueError:
        raise UnknownOperationError(name, [o.value for o in Op]) from None


_MODULES = (
    "hotplug", "read", "snapshot", "commit", "stream", "mirror", "backup", "reopen", "media",
    "restart", "quit",
)  # fmt: skip


_loaded: list[bool] = []


def _load() -> None:
    """Import the operation modules (each registers its operations)."""
    if _loaded:
        return
    _loaded.append(True)
    for name in _MODULES:
        importlib.import_module(f"testbed.compare.ops.{name}")
    missing = [o.value for o in Op if o not in REGISTRY]
    if missing:
        raise RegistryError(f"operations without a module: {', '.join(missing)}")


def all_operations() -> dict[Op, Operation]:
    _load()
    return dict(REGISTRY)
