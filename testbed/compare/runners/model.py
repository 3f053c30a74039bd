"""Oracle 4: the Python model of QEMU's block layer, opening through the same broker.

The scenario is replayed on :class:`testbed.block.layer.BlockLayer` with a
:class:`~testbed.transport.HookClient` to an in-process broker holding the
scenario's policy; the broker's audit records are the trace, exactly as for
patched QEMU.
"""

from __future__ import annotations

import os
import time
from typing import Any

from testbed.block.layer import BlockLayer
from testbed.broker import serve_socketpair
from testbed.compare.normalise import from_audit, normalise
from testbed.compare.runners.common import DRIVE, OracleResult, Setup
from testbed.compare.scenarios import READ_SPAN
from testbed.errors import TestbedError
from testbed.transport import HookClient


def run(setup: Setup) -> OracleResult:
    result = OracleResult()
    sc = setup.scenario
    broker, theirs = serve_socketpair(setup.policy())
    client = HookClient(theirs)
    start = time.monotonic()
    try:
        layer = BlockLayer(client)
        launched = _attach(layer, setup)
        result.operations.append(("launch", launched))
        # A -drive or -blockdev that fails at startup ends QEMU; so it ends the model.
        if launched == "ok":
            for op in sc.operations:
                result.operations.append((op, _do(layer, setup, op)))
    finally:
        client.close()
        broker.stop()
        result.seconds = time.monotonic() - start
    # the model joins relative names to our working directory, as the hook does
    result.trace = normalise(from_audit(broker.records), setup.root, qemu_cwd=os.getcwd())
    return result


def _attach(layer: Any, setup: Setup) -> str:
    """What QEMU's command line does: -drive (and a device) or -blockdev."""
    sc = setup.scenario
    fmt = "raw" if setup.image.format == "vvfat" else setup.image.format
    try:
        if sc.attach in ("drive", "drive-device"):
            layer.drive_add(
                filename=setup.filename(),
                fmt=fmt,
                drive_id=DRIVE,
                read_only=sc.read_only,
                cache_direct=sc.cache_direct,
            )
            if sc.attach == "drive-device":
                layer.attach_device(DRIVE)
        elif sc.attach == "blockdev":
            layer.blockdev_add(
                driver=fmt,
                node_name=DRIVE,
                filename=setup.filename(),
                read_only=sc.read_only,
                cache_direct=sc.cache_direct,
            )
        return "ok"
    except (TestbedError, OSError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__


def _do(layer: Any, setup: Setup, op: str) -> str:
    sc = setup.scenario
    try:
        if op == "add":
            layer.blockdev_add(
                driver=setup.image.format,
                node_name=DRIVE,
                filename=setup.filename(),
                read_only=sc.read_only,
                cache_direct=sc.cache_direct,
            )
        elif op == "del":
            layer.blockdev_del(DRIVE)
        elif op == "read":
            layer.read(DRIVE, *READ_SPAN)
        elif op in ("snapshot-qmp", "snapshot-existing"):
            layer.blockdev_snapshot_sync(
                DRIVE, str(setup.overlay), fmt="qcow2", existing=op == "snapshot-existing"
            )
        elif op == "snapshot-hmp":
            layer.hmp_snapshot_blkdev(DRIVE, str(setup.overlay), fmt="qcow2")
        elif op == "quit":
            layer.quit()
        return "ok"
    except (TestbedError, OSError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
