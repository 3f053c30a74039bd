"""``block-commit``: a layer into its base, or the active layer (``block-job-complete``)."""

from __future__ import annotations

from testbed.compare.ops import Op, OpContext, Operation, register
from testbed.compare.steps import Step, qmp, wait

JOB = "job0"


def ready_complete(job: str = JOB) -> tuple[Step, ...]:
    return (
        wait("BLOCK_JOB_READY", job),
        qmp("block-job-complete", device=job),
        wait("BLOCK_JOB_COMPLETED", job),
    )


def _intermediate(ctx: OpContext, **extra: str) -> tuple[Step, ...]:
    args = {"device": "drive0", "job-id": JOB, "top": ctx.mid, **extra}
    return (qmp("block-commit", **args), wait("BLOCK_JOB_COMPLETED", JOB))


def _active(ctx: OpContext) -> tuple[Step, ...]:
    return (qmp("block-commit", **{"device": "drive0", "job-id": JOB}), *ready_complete())


register(
    Operation(
        name=Op.COMMIT,
        summary="block-commit of the second layer into the base",
        steps=_intermediate,
    )
)
register(
    Operation(
        name=Op.COMMIT_BACKING_FILE,
        summary="block-commit of the second layer, backing-file names the base",
        steps=lambda ctx: _intermediate(
            ctx, **{"base": ctx.bottom, "backing-file": ctx.backing_name}
        ),
    )
)
register(
    Operation(
        name=Op.COMMIT_ACTIVE,
        summary="block-commit of the active layer, then block-job-complete",
        steps=_active,
    )
)
