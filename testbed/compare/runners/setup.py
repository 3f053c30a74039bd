"""A scenario made ready for one oracle: the binaries, a fresh copy of its image, the recipe run.

:func:`prepare` copies the image directory and runs the recipe; the
:class:`Setup` it returns expands ``$D``, ``$IMAGE`` and ``$FORMAT`` in the
scenario's options and steps and gives the broker's policy and QEMU's
:class:`~testbed.qemu.MachineConfig`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.broker import Policy
from testbed.compare.runners.images import ImageInfo
from testbed.compare.scenarios import Grant, Scenario
from testbed.compare.steps import Step, substitute, substituted
from testbed.errors import ScenarioSetupError
from testbed.qemu import DEFAULT_VERSION, Kind, MachineConfig, qemu_binary

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
