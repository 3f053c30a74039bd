"""``quit``: QEMU lets go of its images (the drop back to read-only shows as the last open)."""

from __future__ import annotations

from testbed.compare.ops import Op, OpContext, Operation, register
from testbed.compare.steps import QUIT, Step


def _steps(ctx: OpContext) -> tuple[Step, ...]:
    return (QUIT,)


register(Operation(name=Op.QUIT, summary="QMP quit", steps=_steps))
