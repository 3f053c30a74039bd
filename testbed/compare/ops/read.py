"""A guest-side read of the first MiB (HMP ``qemu-io``)."""

from __future__ import annotations

from testbed.compare.ops import Op, OpContext, Operation, register
from testbed.compare.steps import Step, read

#: What a ``read`` operation reads: (offset, length).
READ_SPAN = (0, 1 << 20)


def _steps(ctx: OpContext) -> tuple[Step, ...]:
    return (read(*READ_SPAN),)


register(Operation(name=Op.READ, summary="qemu-io read of the first MiB", steps=_steps))
