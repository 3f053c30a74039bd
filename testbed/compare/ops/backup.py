"""``drive-backup`` (sync full, top) and ``blockdev-backup``."""

from __future__ import annotations

from testbed.compare.ops import Op, OpContext, Operation, register
from testbed.compare.ops.commit import JOB
from testbed.compare.ops.mirror import MAKE_NODE_TARGET, add_target
from testbed.compare.steps import Step, qmp, wait

TARGET = "backup.qcow2"


def _drive_backup(sync: str) -> tuple[Step, ...]:
    return (
        qmp(
            "drive-backup",
            **{"device": "drive0", "job-id": JOB, "target": f"$D/{TARGET}"},
            format="qcow2",
            sync=sync,
        ),
        wait("BLOCK_JOB_COMPLETED", JOB),
    )


def _blockdev_backup(ctx: OpContext) -> tuple[Step, ...]:
    return (
        add_target(),
        qmp(
            "blockdev-backup",
            **{"device": "drive0", "job-id": JOB, "target": "target0"},
            sync="full",
        ),
        wait("BLOCK_JOB_COMPLETED", JOB),
    )


register(
    Operation(
        name=Op.BACKUP,
        summary="drive-backup sync=full to a new qcow2",
        steps=lambda c: _drive_backup("full"),
    )
)
register(
    Operation(
        name=Op.BACKUP_TOP,
        summary="drive-backup sync=top to a new qcow2",
        steps=lambda c: _drive_backup("top"),
    )
)
register(
    Operation(
        name=Op.BLOCKDEV_BACKUP,
        summary="blockdev-backup sync=full into a node added before",
        steps=_blockdev_backup,
        recipe=MAKE_NODE_TARGET,
    )
)
