"""``drive-mirror`` (sync full, top, none; complete or cancel) and ``blockdev-mirror``."""

from __future__ import annotations

import functools

from testbed.compare.ops import Op, OpContext, Operation, register
from testbed.compare.ops.commit import JOB, ready_complete
from testbed.compare.steps import Step, qmp, wait

TARGET = "mirror.qcow2"
#: The target node ``blockdev-mirror``/``blockdev-backup`` write into, made before.
NODE_TARGET = "target.qcow2"
MAKE_NODE_TARGET = (
    f"qemu-img create -q -f qcow2 {NODE_TARGET} "
    "$(qemu-img info --output=json -f $FORMAT $IMAGE | "
    "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"virtual-size\"])')",
)


def add_target() -> Step:
    return qmp(
        "blockdev-add",
        driver="qcow2",
        **{"node-name": "target0"},
        file={"driver": "file", "filename": f"$D/{NODE_TARGET}"},
    )


def _drive_mirror(sync: str, *, cancel: bool = False) -> tuple[Step, ...]:
    start = qmp(
        "drive-mirror",
        **{"device": "drive0", "job-id": JOB, "target": f"$D/{TARGET}"},
        format="qcow2",
        sync=sync,
    )
    if cancel:
        return (
            start,
            wait("BLOCK_JOB_READY", JOB),
            qmp("block-job-cancel", device=JOB),
            wait("BLOCK_JOB_COMPLETED", JOB),
        )
    return (start, *ready_complete())


def _drive_mirror_ctx(sync: str, ctx: OpContext) -> tuple[Step, ...]:
    return _drive_mirror(sync)


def _blockdev_mirror(ctx: OpContext) -> tuple[Step, ...]:
    start = qmp(
        "blockdev-mirror", **{"device": "drive0", "job-id": JOB, "target": "target0"}, sync="full"
    )
    return (add_target(), start, *ready_complete())


for _op, _sync in ((Op.MIRROR_FULL, "full"), (Op.MIRROR_TOP, "top"), (Op.MIRROR_NONE, "none")):
    register(
        Operation(
            name=_op,
            summary=f"drive-mirror sync={_sync} to a new qcow2, then block-job-complete",
            steps=functools.partial(_drive_mirror_ctx, _sync),
        )
    )
register(
    Operation(
        name=Op.MIRROR_CANCEL,
        summary="drive-mirror sync=full, then block-job-cancel once ready",
        steps=lambda ctx: _drive_mirror("full", cancel=True),
    )
)
register(
    Operation(
        name=Op.BLOCKDEV_MIRROR,
        summary="blockdev-mirror sync=full into a node added before",
        steps=_blockdev_mirror,
        recipe=MAKE_NODE_TARGET,
    )
)
