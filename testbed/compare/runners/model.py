"""Oracle 4: the Python model of QEMU's block layer, opening through the same broker.

The scenario's QEMU options and steps are replayed on
:class:`testbed.block.monitor.ModelMachine` with a
:class:`~testbed.transport.HookClient` to an in-process broker holding the
scenario's policy; the broker's audit records are the trace, exactly as for
patched QEMU.  ``broker`` steps stop that broker and attach a new one
(the model's ``getfd`` and QMP ``open-hook-set``); every broker's records,
in order, are the trace.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from testbed.block.layer import BlockLayer
from testbed.block.monitor import ModelMachine
from testbed.broker import Broker, serve_socketpair
from testbed.compare.normalise import from_audit, normalise
from testbed.compare.runners.dispatch import run_step
from testbed.compare.runners.result import OracleResult
from testbed.compare.runners.setup import Setup
from testbed.compare.steps import Step
from testbed.errors import TestbedError
from testbed.transport import HookClient


@dataclass(kw_only=True)
class _Brokers:
    """The model's brokers (``broker`` steps), in the order they served."""

    setup: Setup
    all: list[Broker]
    clients: list[HookClient]
    machine: ModelMachine | None = None
    down_errors: list[tuple[str, str]] = field(default_factory=list)

    def kill(self) -> None:
        self.all[-1].stop()

    def restart(self) -> None:
        assert self.machine is not None
        broker, theirs = serve_socketpair(self.setup.policy())
        self.all.append(broker)
        client = HookClient(theirs)
        self.clients.append(client)
        name = f"broker{len(self.all)}"
        self.machine.pass_hook(name, client)
        self.machine.qmp("open-hook-set", fdname=name)


def run(setup: Setup) -> OracleResult:
    result = OracleResult()
    # The model takes the version where QEMU's behaviour differs (so far a
    # sync=none mirror's pivot, testbed/block/jobs.py).
    result.extra["qemu_version"] = setup.binaries.version
    broker, theirs = serve_socketpair(setup.policy())
    client = HookClient(theirs)
    brokers = _Brokers(setup=setup, all=[broker], clients=[client])
    start = time.monotonic()
    try:
        machine = ModelMachine(
            BlockLayer(client, qemu_version=setup.binaries.version), tmpdir=setup.tmpdir
        )
        brokers.machine = machine
        launched = _launch(machine, setup.args())
        result.operations.append(("launch", launched))
        # A -drive or -blockdev that fails at startup ends QEMU; so it ends the model.
        if launched == "ok":
            target = ModelSteps(machine)
            for step in setup.steps():
                result.operations.append((step.label, run_step(target, step, brokers=brokers)))
        else:
            machine.quit()
    finally:
        for c in brokers.clients:
            c.close()
        for b in brokers.all:
            b.stop()
        result.seconds = time.monotonic() - start
    records = [r for b in brokers.all for r in b.records]
    # the model joins relative names to our working directory, as the hook does
    result.trace = normalise(from_audit(records), setup.root, qemu_cwd=os.getcwd())
    if brokers.down_errors:
        result.extra["broker_down_errors"] = [list(e) for e in brokers.down_errors]
    return result


@dataclass(frozen=True)
class ModelSteps:
    """The model as a :class:`~testbed.compare.runners.dispatch.StepTarget`.

    A failure is the first line of the model's error (or the exception's
    class name when it has no text): a refused open is an ``OSError``.
    """

    machine: ModelMachine
    errors: tuple[type[Exception], ...] = (TestbedError, OSError)

    def qmp(self, step: Step) -> str | None:
        self.machine.qmp(step.command, **step.arguments)
        return None

    def hmp(self, step: Step) -> str | None:
        self.machine.hmp(step.line)
        return None

    def read(self, step: Step) -> str | None:
        self.machine.layer.read(step.device, step.offset, step.length)
        return None

    def wait(self, step: Step) -> str | None:
        self.machine.wait(step.command, job=step.job or None, timeout=step.timeout)
        return None

    def quit(self, step: Step) -> str | None:
        self.machine.quit()
        return None

    def error_text(self, err: Exception) -> str:
        return str(err).splitlines()[0] if str(err) else type(err).__name__


def _launch(machine: ModelMachine, args: tuple[str, ...]) -> str:
    try:
        machine.launch(args)
    except (TestbedError, OSError) as err:
        return ModelSteps(machine).error_text(err)
    return "ok"
