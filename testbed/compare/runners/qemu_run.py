"""Scenarios on a real QEMU: its steps over QMP, HMP and qemu-io, and the launch-to-quit run."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from testbed.compare.runners.brokers import BrokerControl
from testbed.compare.runners.dispatch import run_step
from testbed.compare.runners.result import OracleResult
from testbed.compare.runners.setup import Setup
from testbed.compare.steps import Step, matches, wait_timeout
from testbed.errors import QEMUError, TestbedError, WaitTimeout
from testbed.qemu import Machine, QMPCommandError


@dataclass(frozen=True)
class QemuSteps:
    """A running QEMU as a :class:`~testbed.compare.runners.dispatch.StepTarget`.

    A failure is QEMU's own words: the QMP error class and description, an
    HMP or qemu-io complaint, or the first line of the testbed's error.
    """

    vm: Machine
    errors: tuple[type[Exception], ...] = (TestbedError,)

    def qmp(self, step: Step) -> str | None:
        self.vm.qmp(step.command, **step.arguments)
        return None

    def hmp(self, step: Step) -> str | None:
        out = self.vm.hmp(step.line).strip()
        if out and _HMP_ERROR.search(out):
            return f"{step.label}: {out[-300:]}"
        return None

    def read(self, step: Step) -> str | None:
        out = self.vm.qemu_io(step.device, f"read {step.offset} {step.length}")
        if "read " not in out or "error" in out.lower() or "failed" in out.lower():
            return f"qemu-io read: {out.strip()[-300:]}"
        return None

    def wait(self, step: Step) -> str | None:
        wait_event(self.vm, step)
        return None

    def quit(self, step: Step) -> str | None:
        how = self.vm.shutdown()
        if how != "quit":
            return f"QEMU did not quit cleanly ({how})"
        return None

    def error_text(self, err: Exception) -> str:
        if isinstance(err, QMPCommandError):
            return f"{err.error_class}: {err.desc}"
        return str(err).splitlines()[0]


_JOB_ENDS = frozenset({"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR"})
_HMP_ERROR = re.compile(r"error|failed|could not|not found|invalid|unknown", re.IGNORECASE)


def wait_event(vm: Machine, step: Step) -> dict[str, Any]:
    """The next QMP event ``step`` waits for; WaitTimeout naming the event and job."""
    deadline = time.monotonic() + step.timeout
    while True:
        for event in vm.events():
            if matches(event, step):
                if step.command in _JOB_ENDS and step.job:
                    _wait_job_gone(vm, step.job, deadline)
                return event
            data = event.get("data") or {}
            if (
                event.get("event") in _JOB_ENDS
                and step.command not in _JOB_ENDS
                and step.job
                and data.get("device") == step.job
            ):
                raise QEMUError(
                    f"job {step.job!r} ended ({event['event']}: {data.get('error', 'no error')}) "
                    f"before {step.command}"
                )
        if time.monotonic() >= deadline:
            raise wait_timeout(step)
        time.sleep(0.02)


def _wait_job_gone(vm: Machine, job: str, deadline: float) -> None:
    # A job's end event comes before QEMU has let go of the job's nodes;
    # the next step (quit, usually) must not race that release, or the
    # opens it causes land before or after the step's by chance.
    while any(j.get("id") == job for j in vm.qmp("query-jobs")):
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"job {job!r} to be dismissed", 0)
        time.sleep(0.01)


def run_qemu_scenario(
    vm: Machine,
    setup: Setup,
    result: OracleResult,
    steps: list[Step] | None = None,
    brokers: BrokerControl | None = None,
) -> None:
    """Launch ``vm``, do every step, shut down; outcomes go into ``result``."""
    start = time.monotonic()
    try:
        vm.launch()
    except TestbedError as err:
        result.operations.append(("launch", _launch_error(err)))
        vm.shutdown()
        result.seconds = time.monotonic() - start
        return
    result.operations.append(("launch", "ok"))
    failed: dict[str, str] = {}
    target = QemuSteps(vm)
    try:
        for step in steps if steps is not None else setup.steps():
            outcome = run_step(target, step, brokers=brokers, failed_jobs=failed)
            result.operations.append((step.label, outcome))
    finally:
        vm.shutdown()
        result.seconds = time.monotonic() - start


def _launch_error(err: TestbedError) -> str:
    log = getattr(err, "log", "") or ""
    lines = [ln for ln in log.splitlines() if "qemu-system" in ln or "error" in ln.lower()]
    return (lines[-1].strip() if lines else str(err).splitlines()[0])[:400]
