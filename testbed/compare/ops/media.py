"""A CD-ROM's medium: ``blockdev-change-medium``, ``eject``, the tray commands.

The drive is ``-drive if=none,id=cd0,media=cdrom`` under ``-device
ide-cd,drive=cd0,id=cdrom0`` (attach ``cdrom``, machine ``pc``).
"""

from __future__ import annotations

from testbed.compare.ops import Op, OpContext, Operation, register
from testbed.compare.steps import Step, qmp

CDROM = frozenset({"cdrom"})


def _change(ctx: OpContext) -> tuple[Step, ...]:
    return (
        qmp("blockdev-change-medium", id="cdrom0", filename="$IMAGE", format="$FORMAT"),
        qmp("eject", id="cdrom0"),
    )


def _tray(ctx: OpContext) -> tuple[Step, ...]:
    return (
        qmp("blockdev-change-medium", id="cdrom0", filename="$IMAGE", format="$FORMAT"),
        qmp("blockdev-open-tray", id="cdrom0", force=True),
        qmp("blockdev-remove-medium", id="cdrom0"),
        qmp("blockdev-close-tray", id="cdrom0"),
        qmp("blockdev-change-medium", id="cdrom0", filename="$IMAGE", format="$FORMAT"),
    )


register(
    Operation(
        name=Op.CHANGE_MEDIUM,
        summary="blockdev-change-medium into an empty CD-ROM, then eject",
        steps=_change,
        attaches=CDROM,
    )
)
register(
    Operation(
        name=Op.TRAY,
        summary="change-medium, open-tray, remove-medium, close-tray, change-medium again",
        steps=_tray,
        attaches=CDROM,
    )
)
