"""One step dispatch for every oracle (runners.dispatch), with a fake oracle (no QEMU)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from testbed.compare.runners.dispatch import run_step
from testbed.compare.steps import QUIT, Step, StepKind, qmp
from testbed.errors import BlockError


@dataclass
class Fake:
    """Records each call; a QMP command named "bad" raises, "odd" reports a problem."""

    calls: list[str] = field(default_factory=list)
    errors: tuple[type[Exception], ...] = (BlockError,)

    def qmp(self, step: Step) -> str | None:
        self.calls.append(f"qmp {step.command}")
        if step.command == "bad":
            raise BlockError("refused\nsecond line")
        if step.command == "odd":
            raise KeyError("not a step failure")
        return None

    def hmp(self, step: Step) -> str | None:
        self.calls.append("hmp")
        return "hmp said no"

    def read(self, step: Step) -> str | None:
        self.calls.append("read")
        return None

    def wait(self, step: Step) -> str | None:
        self.calls.append(f"wait {step.command}")
        return None

    def quit(self, step: Step) -> str | None:
        self.calls.append("quit")
        return None

    def error_text(self, err: Exception) -> str:
        return f"text: {str(err).splitlines()[0]}"


def test_each_kind_goes_to_its_method() -> None:
    fake = Fake()
    assert run_step(fake, qmp("query-block")) == "ok"
    assert run_step(fake, Step(kind=StepKind.HMP, line="info block")) == "hmp said no"
    assert run_step(fake, QUIT) == "ok"
    assert fake.calls == ["qmp query-block", "hmp", "quit"]


def test_a_failure_is_worded_by_the_target_and_other_errors_propagate() -> None:
    fake = Fake()
    assert run_step(fake, qmp("bad")) == "text: refused"
    with pytest.raises(KeyError):
        run_step(fake, qmp("odd"))


def test_a_wait_for_a_job_that_never_started_fails_at_once() -> None:
    fake, failed = Fake(), {}
    start = qmp("bad", **{"job-id": "j1"})
    assert run_step(fake, start, failed_jobs=failed) == "text: refused"
    wait = Step(kind=StepKind.WAIT, command="BLOCK_JOB_READY", job="j1")
    assert run_step(fake, wait, failed_jobs=failed) == "job 'j1' never started: text: refused"
    assert fake.calls == ["qmp bad"]
    # without tracking the wait is done
    assert run_step(fake, wait) == "ok"
    assert fake.calls[-1] == "wait BLOCK_JOB_READY"
