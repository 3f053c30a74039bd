"""``broker-restart``: a snapshot, the broker killed, a snapshot that fails, a new broker, the
snapshot again (extension patch 0007's ``open-hook-set``).

The failed snapshot is the same command as the one that follows the
restart (same overlay), so nothing it might have left behind could hide:
where the broker is dead its opens reach no broker and are in no trace;
where there is no broker (stock QEMU, seccomp, fd sets) it is not run, so
every oracle's trace is the two snapshots' opens.
"""

from __future__ import annotations

from testbed.compare.ops import Op, OpContext, Operation, register
from testbed.compare.ops.snapshot import OVERLAY
from testbed.compare.steps import BrokerAction, Step, broker, broker_down, qmp

#: The overlay the snapshots after the kill aim at (over ``OVERLAY``).
SECOND = "snap2.qcow2"


def _snapshot(ctx: OpContext, overlay: str) -> Step:
    return qmp(
        "blockdev-snapshot-sync",
        **ctx.selector,
        **{"snapshot-file": f"$D/{overlay}"},
        format="qcow2",
    )


def _steps(ctx: OpContext) -> tuple[Step, ...]:
    return (
        _snapshot(ctx, OVERLAY),
        broker(BrokerAction.KILL),
        broker_down(_snapshot(ctx, SECOND)),
        broker(BrokerAction.RESTART),
        _snapshot(ctx, SECOND),
    )


register(
    Operation(
        name=Op.BROKER_RESTART,
        summary="snapshot, broker killed, a snapshot that fails, new broker, snapshot again",
        steps=_steps,
        # two snapshots by device name: a node-name selector would name the old top
        attaches=frozenset({"drive", "drive-device"}),
    )
)
