"""External snapshots: ``blockdev-snapshot-sync`` (new or existing overlay), HMP."""

from __future__ import annotations

from testbed.compare.ops import Op, OpContext, Operation, register
from testbed.compare.steps import Step, hmp, qmp

#: The overlay every snapshot operation creates, relative to the scenario directory.
OVERLAY = "snap.qcow2"


def _sync(ctx: OpContext, **extra: str) -> tuple[Step, ...]:
    sel = dict(ctx.selector)
    if "node-name" in sel:
        sel["snapshot-node-name"] = "snap0"
    return (
        qmp(
            "blockdev-snapshot-sync",
            **sel,
            **{"snapshot-file": f"$D/{OVERLAY}"},
            format="qcow2",
            **extra,
        ),
    )


def _hmp(ctx: OpContext) -> tuple[Step, ...]:
    return (hmp(f"snapshot_blkdev drive0 $D/{OVERLAY} qcow2"),)


register(
    Operation(name=Op.SNAPSHOT_QMP, summary="blockdev-snapshot-sync to a new overlay", steps=_sync)
)
register(Operation(name=Op.SNAPSHOT_HMP, summary="HMP snapshot_blkdev", steps=_hmp))
register(
    Operation(
        name=Op.SNAPSHOT_EXISTING,
        summary="blockdev-snapshot-sync mode=existing onto an overlay made with qemu-img",
        steps=lambda ctx: _sync(ctx, mode="existing"),
        recipe=(
            f"qemu-img create -q -f qcow2 -u -b $IMAGE -F $FORMAT {OVERLAY} "
            "$(qemu-img info --output=json -f $FORMAT $IMAGE | "
            "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"virtual-size\"])')",
        ),
    )
)
