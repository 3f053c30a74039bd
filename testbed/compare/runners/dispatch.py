"""One step on any oracle that runs steps: a QEMU (QMP, HMP, qemu-io) or the model.

Each oracle gives a :class:`StepTarget`, one method per step kind returning
None when the step worked or the text of what went wrong, plus the
exceptions that mean "the step failed" and how to word them.
:func:`run_step` is the one dispatch: the ``broker`` steps first
(:mod:`testbed.compare.runners.brokers`), then the step kind's method;
with ``failed_jobs`` it remembers the jobs whose start failed, so that a
later ``wait`` for one of them fails at once instead of running out its
timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from testbed.compare.runners.brokers import BrokerControl, broker_step
from testbed.compare.steps import Step, StepKind


class StepTarget(Protocol):
    """An oracle that does steps.  Each method: None when it worked, else the failure."""

    @property
    def errors(self) -> tuple[type[Exception], ...]:
        """What a step raises when it fails (anything else is a bug and propagates)."""
        ...

    def qmp(self, step: Step) -> str | None: ...

    def hmp(self, step: Step) -> str | None: ...

    def read(self, step: Step) -> str | None: ...

    def wait(self, step: Step) -> str | None: ...

    def quit(self, step: Step) -> str | None: ...

    def error_text(self, err: Exception) -> str:
        """The outcome of a step that raised ``err`` (one of :attr:`errors`)."""
        ...


_KINDS: dict[StepKind, Callable[[StepTarget, Step], str | None]] = {
    StepKind.QMP: lambda t, s: t.qmp(s),
    StepKind.HMP: lambda t, s: t.hmp(s),
    StepKind.READ: lambda t, s: t.read(s),
    StepKind.WAIT: lambda t, s: t.wait(s),
    StepKind.QUIT: lambda t, s: t.quit(s),
}


def run_step(
    target: StepTarget,
    step: Step,
    *,
    brokers: BrokerControl | None = None,
    failed_jobs: dict[str, str] | None = None,
) -> str:
    """Do ``step`` on ``target``: "ok" or the failure's text.

    ``brokers`` does the ``broker`` steps (None: they are no-ops);
    ``failed_jobs`` (None: not tracked) collects the jobs whose start failed.
    """
    special = broker_step(brokers, step, lambda s: run_step(target, s, failed_jobs=failed_jobs))
    if special is not None:
        return special
    if failed_jobs is not None and step.kind is StepKind.WAIT and step.job in failed_jobs:
        return f"job {step.job!r} never started: {failed_jobs[step.job]}"
    text = do_step(target, step)
    job = step.arguments.get("job-id") if step.kind is StepKind.QMP else None
    if failed_jobs is not None and text != "ok" and isinstance(job, str):
        failed_jobs[job] = text
    return text


def do_step(target: StepTarget, step: Step) -> str:
    """The step kind's method on ``target``, its exceptions turned into text."""
    try:
        problem = _KINDS[step.kind](target, step)
    except target.errors as err:
        return target.error_text(err)
    return "ok" if problem is None else problem
