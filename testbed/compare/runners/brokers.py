"""The ``broker`` steps (patch 0007) for the oracles that have a broker: patched QEMU, the model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from testbed.compare.steps import BrokerAction, Step, StepKind
from testbed.errors import TestbedError


class BrokerControl(Protocol):
    """What a ``broker`` step does to an oracle that has a broker (patched QEMU, the model)."""

    #: (step label, the error) of each ``broker_down`` step, as it failed.
    down_errors: list[tuple[str, str]]

    def kill(self) -> None: ...

    def restart(self) -> None: ...


def broker_step(
    control: BrokerControl | None, step: Step, run: Callable[[Step], str]
) -> str | None:
    """The outcome of a ``broker`` or ``broker_down`` step (None: any other step, ``run`` it).

    Without a broker both are no-ops: there is nothing to kill, and the
    step the dead broker fails is not run (see :mod:`testbed.compare.steps`).
    """
    if step.kind is not StepKind.BROKER and not step.broker_down:
        return None
    if control is None:
        return "ok"
    if step.kind is StepKind.BROKER:
        try:
            if step.command == BrokerAction.KILL:
                control.kill()
            else:
                control.restart()
        except (TestbedError, OSError) as err:
            return f"broker {step.command}: {err}"
        return "ok"
    text = run(replace(step, broker_down=False))
    if text == "ok":
        return "succeeded although the broker was dead"
    control.down_errors.append((step.label, text))
    return "ok"
