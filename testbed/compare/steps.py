"""What a scenario does once QEMU runs: QMP commands, HMP lines, guest reads, job waits, quit.

A ``broker`` step (``kill`` or ``restart``) kills the hook's broker or
starts a new one and attaches it (QMP ``open-hook-set``, patch 0007) where
an oracle has a broker (patched QEMU, the model); elsewhere it does
nothing.  A QMP or HMP step marked ``broker_down`` is expected to fail
because the broker is dead: an oracle with a broker runs it, and it is
``ok`` if it failed (the error is kept beside the result); an oracle with
no broker does not run it (its opens would not happen in the patched
QEMU either: no broker heard them).

A :class:`Step` is the same for every oracle: the model
(:class:`testbed.block.monitor.ModelMachine`), patched and stock QEMU and the
fd-set run.  In any string ``$D`` stands for the scenario's own directory
(each oracle has a fresh copy), substituted by :func:`substitute`.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field, replace
from typing import Any

from testbed.compare.attach import DRIVE
from testbed.errors import ScenarioError, WaitTimeout

#: The scenario directory inside step arguments and QEMU options.
DIR_MARK = "$D"
#: How long a ``wait`` step waits by default, in seconds.
WAIT_TIMEOUT = 60.0


class StepKind(enum.StrEnum):
    QMP = "qmp"
    HMP = "hmp"
    READ = "read"
    WAIT = "wait"
    QUIT = "quit"
    BROKER = "broker"


class BrokerAction(enum.StrEnum):
    KILL = "kill"
    RESTART = "restart"


@dataclass(frozen=True, kw_only=True)
class Step:
    kind: StepKind
    #: QMP command name (``qmp``), or the event name (``wait``).
    command: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    #: HMP command line (``hmp``).
    line: str = ""
    #: The job a ``wait`` waits for (its ``device`` in the event data); "" for any.
    job: str = ""
    #: ``read``: the drive or node, offset and length.
    device: str = DRIVE
    offset: int = 0
    length: int = 0
    timeout: float = WAIT_TIMEOUT
    #: A qmp or hmp step expected to fail because the broker is dead.
    broker_down: bool = False

    def __post_init__(self) -> None:
        if self.kind is StepKind.BROKER and self.command not in tuple(BrokerAction):
            known = ", ".join(a.value for a in BrokerAction)
            raise ScenarioError(f"broker step {self.command!r}: give one of {known}")
        if self.broker_down and self.kind not in (StepKind.QMP, StepKind.HMP):
            raise ScenarioError(
                f"a {self.kind} step cannot be marked broker_down (qmp or hmp only)"
            )
        if self.kind is StepKind.QMP and not self.command:
            raise ScenarioError("a qmp step needs a command")
        if self.kind is StepKind.HMP and not self.line:
            raise ScenarioError("an hmp step needs a command line")
        if self.kind is StepKind.WAIT and not self.command:
            raise ScenarioError("a wait step needs an event name")
        if self.kind is StepKind.READ and (self.offset < 0 or self.length <= 0):
            raise ScenarioError(f"read of {self.length} bytes at {self.offset}")
        if self.timeout <= 0:
            raise ScenarioError(f"wait timeout {self.timeout} is not positive")

    @property
    def label(self) -> str:
        """A short name for reports: ``block-commit``, ``wait BLOCK_JOB_READY job0``."""
        if self.broker_down:
            return replace(self, broker_down=False).label + " (broker down)"
        if self.kind is StepKind.BROKER:
            return f"broker {self.command}"
        if self.kind is StepKind.QMP:
            return self.command
        if self.kind is StepKind.HMP:
            return "hmp " + self.line.split()[0]
        if self.kind is StepKind.WAIT:
            return f"wait {self.command}" + (f" {self.job}" if self.job else "")
        if self.kind is StepKind.READ:
            return "read"
        return "quit"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": str(self.kind)}
        if self.kind is StepKind.QMP:
            out |= {"command": self.command, "arguments": self.arguments}
        elif self.kind is StepKind.HMP:
            out["line"] = self.line
        elif self.kind is StepKind.WAIT:
            out |= {"event": self.command, "job": self.job, "timeout": self.timeout}
        elif self.kind is StepKind.READ:
            out |= {"device": self.device, "offset": self.offset, "length": self.length}
        elif self.kind is StepKind.BROKER:
            out["action"] = self.command
        if self.broker_down:
            out["broker_down"] = True
        return out


def qmp(command: str, **arguments: Any) -> Step:
    return Step(kind=StepKind.QMP, command=command, arguments=arguments)


def hmp(line: str) -> Step:
    return Step(kind=StepKind.HMP, line=line)


def wait(event: str, job: str = "", timeout: float = WAIT_TIMEOUT) -> Step:
    return Step(kind=StepKind.WAIT, command=event, job=job, timeout=timeout)


def read(offset: int, length: int, device: str = DRIVE) -> Step:
    return Step(kind=StepKind.READ, device=device, offset=offset, length=length)


def broker(action: str) -> Step:
    return Step(kind=StepKind.BROKER, command=action)


def broker_down(step: Step) -> Step:
    """``step``, expected to fail because the broker is dead."""
    return replace(step, broker_down=True)


QUIT = Step(kind=StepKind.QUIT)


def substitute(value: Any, directory: str) -> Any:
    """``value`` with every ``$D`` in its strings replaced by ``directory``."""
    if isinstance(value, str):
        return value.replace(DIR_MARK, directory)
    if isinstance(value, dict):
        return {k: substitute(v, directory) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(substitute(v, directory) for v in value)
    return value


def substituted(step: Step, directory: str) -> Step:
    return Step(
        kind=step.kind,
        command=step.command,
        arguments=substitute(step.arguments, directory),
        line=substitute(step.line, directory),
        job=step.job,
        device=step.device,
        offset=step.offset,
        length=step.length,
        timeout=step.timeout,
        broker_down=step.broker_down,
    )


def matches(event: dict[str, Any], step: Step) -> bool:
    """Whether a QMP event is the one a ``wait`` step waits for."""
    if event.get("event") != step.command:
        return False
    data = event.get("data") or {}
    return not step.job or step.job in (data.get("device"), data.get("id"))


def wait_timeout(step: Step) -> WaitTimeout:
    what = f"QMP event {step.command}" + (f" of job {step.job!r}" if step.job else "")
    return WaitTimeout(what, step.timeout)


def canonical(steps: tuple[Step, ...]) -> str:
    """A stable text of the steps (scenario files and built-ins compare by it)."""
    return json.dumps([s.to_json() for s in steps], sort_keys=True)
