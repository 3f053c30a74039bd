"""``blockdev-add`` / ``blockdev-del`` at run time (attach ``hotplug``)."""

from __future__ import annotations

from typing import Any

from testbed.compare.ops import Op, OpContext, Operation, register
from testbed.compare.steps import Step, qmp
from testbed.qemu.commandline import Attach, AttachKind


def add_args(ctx: OpContext) -> dict[str, Any]:
    """``blockdev-add``'s arguments for the scenario's image as node ``drive0``."""
    return Attach(
        filename="$IMAGE",
        fmt="$FORMAT",
        kind=AttachKind.BLOCKDEV,
        read_only=ctx.read_only,
        cache_direct=ctx.cache_direct,
    ).blockdev_options()


def _add(ctx: OpContext) -> tuple[Step, ...]:
    return (qmp("blockdev-add", **add_args(ctx)),)


def _del(ctx: OpContext) -> tuple[Step, ...]:
    return (qmp("blockdev-del", **{"node-name": "drive0"}),)


register(Operation(name=Op.ADD, summary="blockdev-add of the image", steps=_add))
register(Operation(name=Op.DEL, summary="blockdev-del of the image", steps=_del))
