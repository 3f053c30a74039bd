"""``blockdev-add`` / ``blockdev-del`` at run time (attach ``hotplug``)."""

from __future__ import annotations

from typing import Any

from testbed.compare.ops import Op, OpContext, Operation, register
from testbed.compare.steps import Step, qmp


def add_args(ctx: OpContext) -> dict[str, Any]:
    args: dict[str, Any] = {
        "driver": "$FORMAT",
        "node-name": "drive0",
        "file": {"driver": "file", "filename": "$IMAGE"},
    }
    if ctx.read_only:
        args["read-only"] = True
    if ctx.cache_direct:
        args["cache"] = {"direct": True}
    return args


def _add(ctx: OpContext) -> tuple[Step, ...]:
    return (qmp("blockdev-add", **add_args(ctx)),)


def _del(ctx: OpContext) -> tuple[Step, ...]:
    return (qmp("blockdev-del", **{"node-name": "drive0"}),)


register(Operation(name=Op.ADD, summary="blockdev-add of the image", steps=_add))
register(Operation(name=Op.DEL, summary="blockdev-del of the image", steps=_del))
