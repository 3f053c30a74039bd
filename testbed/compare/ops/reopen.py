"""``blockdev-reopen``: read-only to read-write and back; ``cache.direct`` on and off.

The image is attached as ``file-node``: ``-blockdev driver=file,node-name=file0,
read-only=on`` and the format node ``drive0`` over it, both read-only.
"""

from __future__ import annotations

from typing import Any

from testbed.compare.ops import Op, OpContext, Operation, register
from testbed.compare.steps import Step, qmp


def _file(**opts: Any) -> dict[str, Any]:
    return {"driver": "file", "node-name": "file0", "filename": "$IMAGE", **opts}


def _format(read_only: bool) -> dict[str, Any]:
    return {"driver": "$FORMAT", "node-name": "drive0", "file": "file0", "read-only": read_only}


def _rw(ctx: OpContext) -> tuple[Step, ...]:
    return (
        qmp("blockdev-reopen", options=[_file(**{"read-only": False}), _format(False)]),
        qmp("blockdev-reopen", options=[_format(True), _file(**{"read-only": True})]),
    )


def _direct(ctx: OpContext) -> tuple[Step, ...]:
    return (
        qmp("blockdev-reopen", options=[_file(**{"read-only": True, "cache": {"direct": True}})]),
        qmp("blockdev-reopen", options=[_file(**{"read-only": True})]),
    )


FILE_NODE = frozenset({"file-node"})
register(
    Operation(
        name=Op.REOPEN_RW,
        summary="blockdev-reopen read-only -> read-write -> read-only",
        steps=_rw,
        attaches=FILE_NODE,
    )
)
register(
    Operation(
        name=Op.REOPEN_DIRECT,
        summary="blockdev-reopen cache.direct on, then off",
        steps=_direct,
        attaches=FILE_NODE,
    )
)
