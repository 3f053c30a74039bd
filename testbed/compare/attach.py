"""How a built-in scenario gives QEMU its image: the :class:`AttachMode` vocabulary.

Each attachment is one member and one entry in :data:`_ARGS` (the machine
type and QEMU options it puts on the command line; ``$IMAGE`` and
``$FORMAT`` are filled in per oracle).  A scenario file may name any other
label (``custom`` by default): it writes its own options.

This module imports nothing from the comparison, so the operations
(:mod:`testbed.compare.ops`) can name attachments too.  The ``-drive``
values come from the one builder, :class:`testbed.qemu.commandline.Attach`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

from testbed.errors import ScenarioError
from testbed.qemu.commandline import Attach

#: Node name (``-blockdev``, hotplug) or BlockBackend id (``-drive``) of the image.
DRIVE = "drive0"


class AttachMode(enum.StrEnum):
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
    def of(cls, name: str) -> AttachMode:
        """The attachment called ``name``; ScenarioError if there is none."""
        try:
            return cls(name)
        except ValueError:
            raise ScenarioError(f"unknown attachment {name!r}") from None


#: The label of an attachment a scenario file writes itself.
CUSTOM = "custom"
#: Attachments that are themselves what a scenario exercises.
EXERCISED = frozenset(
    {
        AttachMode.HOTPLUG,
        AttachMode.NODE_REFS,
        AttachMode.JSON,
        AttachMode.SNAPSHOT_ON,
        AttachMode.SNAPSHOT,
    }
)
#: Attachments whose ``-snapshot`` overlay goes to ``TMPDIR``.
TEMPORARY_OVERLAY = frozenset({AttachMode.SNAPSHOT, AttachMode.SNAPSHOT_ON})

_DEVICE = ("-S", "-device", f"virtio-blk-pci,drive={DRIVE}")
#: (machine, options) from the image (its ``-drive`` value from the builder) and the
#: ``read-only``/``cache.direct`` options as ``-blockdev`` key=value words.
_Args = Callable[[Attach, list[str]], tuple[str, tuple[str, ...]]]


def _image(*, read_only: bool, cache_direct: bool) -> Attach:
    return Attach(
        filename="$IMAGE",
        fmt="$FORMAT",
        node=DRIVE,
        read_only=read_only,
        cache_direct=cache_direct,
    )


def _json(image: Attach, opts: list[str]) -> tuple[str, tuple[str, ...]]:
    # a comma inside a -drive value is written twice
    tree = '{"driver":"$FORMAT",,"file":{"driver":"file",,"filename":"$IMAGE"}}'
    return "pc", ("-drive", ",".join([f"file=json:{tree}", "if=none", f"id={DRIVE}"]), *_DEVICE)


def _blockdev(image: Attach, opts: list[str]) -> tuple[str, tuple[str, ...]]:
    node = ["driver=$FORMAT", f"node-name={DRIVE}", "file.driver=file", "file.filename=$IMAGE"]
    return "none", ("-blockdev", ",".join([*node, *opts]))


def _snapshot_on(image: Attach, opts: list[str]) -> tuple[str, tuple[str, ...]]:
    return "pc", ("-drive", dataclasses.replace(image, snapshot=True).drive_arg(), *_DEVICE)


_CDROM = Attach(filename="", node="cd0", cdrom=True)

_ARGS: dict[AttachMode, _Args] = {
    AttachMode.DRIVE: lambda image, opts: ("none", ("-drive", image.drive_arg())),
    AttachMode.DRIVE_DEVICE: lambda image, opts: ("pc", ("-drive", image.drive_arg(), *_DEVICE)),
    AttachMode.SNAPSHOT_ON: _snapshot_on,
    AttachMode.SNAPSHOT: lambda image, opts: (
        "pc",
        ("-snapshot", "-drive", image.drive_arg(), *_DEVICE),
    ),
    AttachMode.JSON: _json,
    AttachMode.BLOCKDEV: _blockdev,
    AttachMode.FILE_NODE: lambda image, opts: (
        "none",
        (
            "-blockdev",
            "driver=file,node-name=file0,filename=$IMAGE,read-only=on",
            "-blockdev",
            f"driver=$FORMAT,node-name={DRIVE},file=file0,read-only=on",
        ),
    ),
    AttachMode.CDROM: lambda image, opts: (
        "pc",
        ("-S", "-drive", _CDROM.drive_arg(), "-device", "ide-cd,drive=cd0,id=cdrom0"),
    ),
    AttachMode.HOTPLUG: lambda image, opts: ("none", ()),
    AttachMode.NODE_REFS: lambda image, opts: ("none", ()),
}


def attach_args(
    attach: AttachMode | str,
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
    return _ARGS[AttachMode.of(attach)](
        _image(read_only=read_only, cache_direct=cache_direct), opts
    )
