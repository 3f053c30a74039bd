"""How a built-in scenario gives QEMU its image: the :class:`Attach` vocabulary.

Each attachment is one member and one entry in :data:`_ARGS` (the machine
type and QEMU options it puts on the command line; ``$IMAGE`` and
``$FORMAT`` are filled in per oracle).  A scenario file may name any other
label (``custom`` by default): it writes its own options.

This module imports nothing from the comparison, so the operations
(:mod:`testbed.compare.ops`) can name attachments too.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from testbed.errors import ScenarioError

#: Node name (``-blockdev``, hotplug) or BlockBackend id (``-drive``) of the image.
DRIVE = "drive0"


class Attach(enum.StrEnum):
    DRIVE = "drive"
    DRIVE_DEVICE = "drive-device"
    BLOCKDEV = "blockdev"
    HOTPLUG = "hotplug"
    NODE_REFS = "node-refs"
    FILE_NODE = "file-node"
    JSON = "json"
    SNAPSHOT_ON = "snapshot-on"
    SNAPSHOT = "snapshot"
    CDROM = "cdrom"

    @classmethod
    def of(cls, name: str) -> Attach:
        """The attachment called ``name``; ScenarioError if there is none."""
        try:
            return cls(name)
        except ValueError:
            raise ScenarioError(f"unknown attachment {name!r}") from None


#: The label of an attachment a scenario file writes itself.
CUSTOM = "custom"
#: Attachments that are themselves what a scenario exercises.
EXERCISED = frozenset(
    {Attach.HOTPLUG, Attach.NODE_REFS, Attach.JSON, Attach.SNAPSHOT_ON, Attach.SNAPSHOT}
)
#: Attachments whose ``-snapshot`` overlay goes to ``TMPDIR``.
TEMPORARY_OVERLAY = frozenset({Attach.SNAPSHOT, Attach.SNAPSHOT_ON})

_DEVICE = ("-S", "-device", f"virtio-blk-pci,drive={DRIVE}")
#: (machine, options) from the ``-drive`` options (``read-only``, ``cache.direct`` in them).
_Args = Callable[[list[str], list[str]], tuple[str, tuple[str, ...]]]


def _json(drive: list[str], opts: list[str]) -> tuple[str, tuple[str, ...]]:
    # a comma inside a -drive value is written twice
    tree = '{"driver":"$FORMAT",,"file":{"driver":"file",,"filename":"$IMAGE"}}'
    return "pc", ("-drive", ",".join([f"file=json:{tree}", "if=none", f"id={DRIVE}"]), *_DEVICE)


def _blockdev(drive: list[str], opts: list[str]) -> tuple[str, tuple[str, ...]]:
    node = ["driver=$FORMAT", f"node-name={DRIVE}", "file.driver=file", "file.filename=$IMAGE"]
    return "none", ("-blockdev", ",".join([*node, *opts]))


_ARGS: dict[Attach, _Args] = {
    Attach.DRIVE: lambda drive, opts: ("none", ("-drive", ",".join(drive))),
    Attach.DRIVE_DEVICE: lambda drive, opts: ("pc", ("-drive", ",".join(drive), *_DEVICE)),
    Attach.SNAPSHOT_ON: lambda drive, opts: (
        "pc",
        ("-drive", ",".join([*drive, "snapshot=on"]), *_DEVICE),
    ),
    Attach.SNAPSHOT: lambda drive, opts: ("pc", ("-snapshot", "-drive", ",".join(drive), *_DEVICE)),
    Attach.JSON: _json,
    Attach.BLOCKDEV: _blockdev,
    Attach.FILE_NODE: lambda drive, opts: (
        "none",
        (
            "-blockdev",
            "driver=file,node-name=file0,filename=$IMAGE,read-only=on",
            "-blockdev",
            f"driver=$FORMAT,node-name={DRIVE},file=file0,read-only=on",
        ),
    ),
    Attach.CDROM: lambda drive, opts: (
        "pc",
        ("-S", "-drive", "if=none,id=cd0,media=cdrom", "-device", "ide-cd,drive=cd0,id=cdrom0"),
    ),
    Attach.HOTPLUG: lambda drive, opts: ("none", ()),
    Attach.NODE_REFS: lambda drive, opts: ("none", ()),
}


def attach_args(
    attach: Attach | str,
    *,
    read_only: bool = False,
    cache_direct: bool = False,
) -> tuple[str, tuple[str, ...]]:
    """(machine, QEMU options) for a built-in attachment of ``$IMAGE``."""
    opts = []
    if read_only:
        opts.append("read-only=on")
    if cache_direct:
        opts.append("cache.direct=on")
    drive = ["file=$IMAGE", "format=$FORMAT", "if=none", f"id={DRIVE}", *opts]
    return _ARGS[Attach.of(attach)](drive, opts)
