"""What the runners share: images, the scenario directory, QEMU's command line and operations."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from testbed.broker import Policy
from testbed.compare.scenarios import Grant, Scenario
from testbed.compare.steps import (
    BrokerAction,
    Step,
    StepKind,
    matches,
    substitute,
    substituted,
    wait_timeout,
)
from testbed.compare.trace import Open
from testbed.errors import QEMUError, TestbedError, WaitTimeout
from testbed.errors import ScenarioSetupError as ScenarioSetupError  # re-exported
from testbed.qemu import DEFAULT_VERSION, Kind, Machine, MachineConfig, QMPCommandError, qemu_binary

#: Node name (``-blockdev``, hotplug) or BlockBackend id (``-drive``) of the image.
DRIVE = "drive0"
#: Where QEMU's g_mkstemp puts temporary images.
TEMP_DIR = "/var/tmp"
#: Inside the scenario directory: ``TMPDIR`` for scenarios tagged ``tmpdir`` (-snapshot).
SCENARIO_TMP = "tmp"


@dataclass(frozen=True, kw_only=True)
class Binaries:
    """The QEMU binaries a run uses (chosen by the caller, once per version, for every runner)."""

    patched: Path
    stock: Path
    #: The QEMU version both are (a name of ``testbed.qemu.VERSIONS``): the
    #: fd-set side and the model do what that version needs.
    version: str = DEFAULT_VERSION

    @classmethod
    def of(cls, version: str) -> Binaries:
        """``version``'s patched and stock ``qemu-system-x86_64``."""
        return cls(
            patched=qemu_binary(version, Kind.PATCHED),
            stock=qemu_binary(version, Kind.STOCK),
            version=version,
        )


@dataclass(frozen=True, kw_only=True)
class ImageInfo:
    """One entry of ``build/images/index.json``."""

    name: str
    format: str
    subformat: str | None
    dir: Path
    main: Path  # absolute, inside ``dir``

    @property
    def main_rel(self) -> str:
        return str(self.main.relative_to(self.dir))


def load_index(path: Path) -> dict[str, ImageInfo]:
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ScenarioSetupError(f"no image index {path} (run `make images`)") from err
    except json.JSONDecodeError as err:
        raise ScenarioSetupError(f"image index {path} is not JSON: {err}") from err
    out = {}
    for e in entries:
        out[e["name"]] = ImageInfo(
            name=e["name"],
            format=e["format"],
            subformat=e.get("subformat"),
            dir=Path(e["dir"]),
            main=Path(e["main"]),
        )
    return out


@dataclass(frozen=True, kw_only=True)
class Setup:
    """A scenario ready to run for one oracle: ``root`` is a fresh copy of the image dir."""

    scenario: Scenario
    image: ImageInfo | None
    root: Path
    #: Where logs, strace output and audit files go (outside ``root``).
    logs: Path
    binaries: Binaries

    @property
    def main(self) -> Path:
        if self.scenario.main or self.image is None:
            return self.root / self.scenario.main
        return self.root / self.image.main_rel

    @property
    def format(self) -> str:
        """``$FORMAT``: what QEMU is told the image is."""
        if self.scenario.format:
            return self.scenario.format
        if self.image is None:
            return "raw"
        return "raw" if self.image.format == "vvfat" else self.image.format

    @property
    def vvfat(self) -> bool:
        return self.image is not None and self.image.format == "vvfat" and not self.scenario.main

    def filename(self, main: str | None = None) -> str:
        """The image's file name as QEMU is given it (``fat:...`` for vvfat)."""
        path = main if main is not None else str(self.main)
        if self.vvfat:
            assert self.image is not None
            prefix = self.image.subformat or "fat:"
            return prefix + ("rw:" if "vvfat-rw" in self.scenario.tags else "") + path
        return path

    @property
    def tmpdir(self) -> str | None:
        """``TMPDIR`` for QEMU and the model (inside the scenario for -snapshot)."""
        return str(self.root / SCENARIO_TMP) if "tmpdir" in self.scenario.tags else None

    def expand(self, value: Any, *, image: str | None = None) -> Any:
        """``value`` with ``$D``, ``$IMAGE`` and ``$FORMAT`` filled in."""
        value = _replace(value, "$IMAGE", image if image is not None else self.filename())
        value = _replace(value, "$FORMAT", self.format)
        return substitute(value, str(self.root))

    def args(self) -> tuple[str, ...]:
        return tuple(self.expand(list(self.scenario.args)))

    def steps(self) -> list[Step]:
        return [_expand_step(self, s) for s in self.scenario.steps]

    def env(self) -> tuple[tuple[str, str], ...]:
        tmp = self.tmpdir
        return (("TMPDIR", tmp),) if tmp else ()

    def machine_config(self, binary: Path, oracle: str, **extra: Any) -> MachineConfig:
        """The scenario's QEMU as ``oracle`` runs it, logging to a fresh ``<oracle>-qemu.log``."""
        log = self.logs / f"{oracle}-qemu.log"
        log.unlink(missing_ok=True)
        return MachineConfig(
            binary=binary,
            machine=self.scenario.machine,
            args=self.args(),
            env=self.env(),
            log_path=log,
            **extra,
        )

    def policy(self) -> Policy:
        grant = self.scenario.grant
        # vvfat rw makes its write target in /var/tmp (g_mkstemp, through the hook
        # with the series' extension patch): grant that, or vvfat rw cannot start
        temp = [TEMP_DIR] if "vvfat-rw" in self.scenario.tags else []
        # vvfat scans its directory: with opendir() (stock) that is an open
        # the seccomp supervisor serves, and the broker hands out directory
        # fds only under a rule that allows them (docs/broker.md).
        dirs = self.image is not None and self.image.format == "vvfat"
        if grant is Grant.RO:
            return Policy.from_grants(ro=[self.root], create=temp, directories=dirs)
        if grant is Grant.MAIN:
            return Policy.from_grants(rw=[self.main], create=temp, directories=dirs)
        return Policy.from_grants(create=[self.root, *temp], directories=dirs)


def _replace(value: Any, mark: str, text: str) -> Any:
    if isinstance(value, str):
        return value.replace(mark, text)
    if isinstance(value, dict):
        return {k: _replace(v, mark, text) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace(v, mark, text) for v in value]
    return value


def _expand_step(setup: Setup, step: Step) -> Step:
    d = str(setup.root)
    expanded = Step(
        kind=step.kind,
        command=step.command,
        arguments=setup.expand(step.arguments),
        line=setup.expand(step.line),
        job=step.job,
        device=step.device,
        offset=step.offset,
        length=step.length,
        timeout=step.timeout,
        broker_down=step.broker_down,
    )
    return substituted(expanded, d)


def prepare(
    scenario: Scenario, image: ImageInfo | None, base: Path, oracle: str, binaries: Binaries
) -> Setup:
    """A fresh copy of ``image``'s directory under ``base/<scenario>/<oracle>``, recipe run."""
    where = base.resolve() / scenario.name
    root = where / oracle
    logs = where / "logs"
    if root.exists():
        shutil.rmtree(root)
    logs.mkdir(parents=True, exist_ok=True)
    if image is not None:
        # cp keeps the images sparse (shutil would write every hole: 58 MB of
        # images became 1.2 GB of copies)
        done = subprocess.run(
            ["cp", "-a", "--sparse=always", f"{image.dir}/.", str(root)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise ScenarioSetupError(
                f"cannot copy image {image.name} to {root}: {done.stderr.strip()}"
            )
        (root / ".recipe-hash").unlink(missing_ok=True)
    else:
        root.mkdir(parents=True)
    setup = Setup(scenario=scenario, image=image, root=root, logs=logs, binaries=binaries)
    if setup.tmpdir:
        os.makedirs(setup.tmpdir, exist_ok=True)
    for command in scenario.recipe:
        line = setup.expand(command)
        done = subprocess.run(
            line, shell=True, cwd=root, capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise ScenarioSetupError(
                f"scenario {scenario.name}: recipe step {line!r} failed: "
                f"{(done.stderr or done.stdout).strip()[-300:]}"
            )
    return setup


@dataclass(kw_only=True)
class OracleResult:
    """What one oracle did for a scenario."""

    trace: list[Open] = field(default_factory=list)
    #: (operation, "ok" or the error text), in order; "launch" first for QEMU.
    operations: list[tuple[str, str]] = field(default_factory=list)
    #: Set when the oracle could not run at all (missing binary, setup failed).
    skipped: str = ""
    seconds: float = 0.0
    log: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.skipped and all(res == "ok" for _, res in self.operations)

    @property
    def first_error(self) -> str:
        for op, res in self.operations:
            if res != "ok":
                return f"{op}: {res}"
        return self.skipped

    def to_json(self) -> dict[str, Any]:
        return {
            "trace": [o.to_json() for o in self.trace],
            "operations": [{"op": op, "result": res} for op, res in self.operations],
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "log": self.log,
            **self.extra,
        }


# -- the broker steps (patch 0007) -------------------------------------------------------


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


# -- QEMU ------------------------------------------------------------------------------


def run_step(
    vm: Machine,
    step: Step,
    failed_jobs: dict[str, str] | None = None,
    brokers: BrokerControl | None = None,
) -> str:
    """Do ``step`` on a running QEMU; "ok" or the error's text (QEMU's own words).

    ``failed_jobs`` collects the jobs whose start failed, so that a later
    ``wait`` for one of them fails at once instead of running out its timeout.
    ``brokers`` does the ``broker`` steps (none: they are no-ops).
    """
    special = broker_step(brokers, step, lambda s: run_step(vm, s, failed_jobs))
    if special is not None:
        return special
    failed = failed_jobs if failed_jobs is not None else {}
    if step.kind is StepKind.WAIT and step.job in failed:
        return f"job {step.job!r} never started: {failed[step.job]}"
    text = _run_step(vm, step)
    job = step.arguments.get("job-id") if step.kind is StepKind.QMP else None
    if text != "ok" and isinstance(job, str):
        failed[job] = text
    return text


def _run_step(vm: Machine, step: Step) -> str:
    try:
        if step.kind is StepKind.QMP:
            vm.qmp(step.command, **step.arguments)
        elif step.kind is StepKind.HMP:
            out = vm.hmp(step.line).strip()
            if out and _HMP_ERROR.search(out):
                return f"{step.label}: {out[-300:]}"
        elif step.kind is StepKind.READ:
            out = vm.qemu_io(step.device, f"read {step.offset} {step.length}")
            if "read " not in out or "error" in out.lower() or "failed" in out.lower():
                return f"qemu-io read: {out.strip()[-300:]}"
        elif step.kind is StepKind.WAIT:
            wait_event(vm, step)
        else:
            how = vm.shutdown()
            if how != "quit":
                return f"QEMU did not quit cleanly ({how})"
    except QMPCommandError as err:
        return f"{err.error_class}: {err.desc}"
    except TestbedError as err:
        return str(err).splitlines()[0]
    return "ok"


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
    try:
        for step in steps if steps is not None else setup.steps():
            result.operations.append((step.label, run_step(vm, step, failed, brokers)))
    finally:
        vm.shutdown()
        result.seconds = time.monotonic() - start


def _launch_error(err: TestbedError) -> str:
    log = getattr(err, "log", "") or ""
    lines = [ln for ln in log.splitlines() if "qemu-system" in ln or "error" in ln.lower()]
    return (lines[-1].strip() if lines else str(err).splitlines()[0])[:400]
