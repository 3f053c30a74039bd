"""``block-stream``: the whole chain, or down to a base."""

from __future__ import annotations

from testbed.compare.ops import Op, OpContext, Operation, register
from testbed.compare.steps import Step, qmp, wait

JOB = "job0"


def _stream(ctx: OpContext, **extra: str) -> tuple[Step, ...]:
    args = {"device": "drive0", "job-id": JOB, **extra}
    return (qmp("block-stream", **args), wait("BLOCK_JOB_COMPLETED", JOB))


register(Operation(name=Op.STREAM, summary="block-stream of the whole chain", steps=_stream))
register(
    Operation(
        name=Op.STREAM_BASE,
        summary="block-stream down to the lowest layer",
        steps=lambda ctx: _stream(ctx, base=ctx.bottom),
    )
)
