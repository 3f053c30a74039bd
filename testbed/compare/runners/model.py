"""Oracle 4: the Python model of QEMU's block layer, opening through the same broker.

The scenario's QEMU options and steps are replayed on
:class:`testbed.block.monitor.ModelMachine` with a
:class:`~testbed.transport.HookClient` to an in-process broker holding the
scenario's policy; the broker's audit records are the trace, exactly as for
patched QEMU.
"""

from __future__ import annotations

import os
import time

from testbed.block.layer import BlockLayer
from testbed.block.monitor import ModelMachine
from testbed.broker import serve_socketpair
from testbed.compare.normalise import from_audit, normalise
from testbed.compare.runners.common import OracleResult, Setup
from testbed.compare.steps import Step, StepKind
from testbed.errors import TestbedError
from testbed.transport import HookClient


def run(setup: Setup) -> OracleResult:
    result = OracleResult()
    # The model follows QEMU 7.2's order for every version so far: the one
    # difference the matrix shows (a sync=none mirror's completion on 10.0,
    # docs/compare.md) is not modelled yet; BlockLayer takes no version.
    result.extra["qemu_version"] = setup.binaries.version
    broker, theirs = serve_socketpair(setup.policy())
    client = HookClient(theirs)
    start = time.monotonic()
    try:
        machine = ModelMachine(BlockLayer(client), tmpdir=setup.tmpdir)
        launched = _error_text(lambda: machine.launch(setup.args()))
        result.operations.append(("launch", launched))
        # A -drive or -blockdev that fails at startup ends QEMU; so it ends the model.
        if launched == "ok":
            for step in setup.steps():
                result.operations.append((step.label, _do(machine, step)))
        else:
            machine.quit()
    finally:
        client.close()
        broker.stop()
        result.seconds = time.monotonic() - start
    # the model joins relative names to our working directory, as the hook does
    result.trace = normalise(from_audit(broker.records), setup.root, qemu_cwd=os.getcwd())
    return result


def _do(machine: ModelMachine, step: Step) -> str:
    def go() -> None:
        if step.kind is StepKind.QMP:
            machine.qmp(step.command, **step.arguments)
        elif step.kind is StepKind.HMP:
            machine.hmp(step.line)
        elif step.kind is StepKind.READ:
            machine.layer.read(step.device, step.offset, step.length)
        elif step.kind is StepKind.WAIT:
            machine.wait(step.command, job=step.job or None, timeout=step.timeout)
        else:
            machine.quit()

    return _error_text(go)


def _error_text(fn: object) -> str:
    assert callable(fn)
    try:
        fn()
    except (TestbedError, OSError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return "ok"
