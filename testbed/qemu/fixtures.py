"""pytest fixtures for tests that run a real QEMU (loaded by ``testbed.pytest_plugin``).

* ``qemu_version`` -- parametrised over every registered QEMU version
  ("7.2", "10.0"; ``QEMU_VERSIONS=7.2`` limits it), so a test that uses a
  machine fixture runs once per version, the version in its id
  (``test_read[qemu10.0]``);
* ``broker`` -- a started in-process :class:`~testbed.broker.Broker` whose
  policy lets QEMU create, read and write anything beneath the test's
  ``tmp_path``; stopped after the test.
* ``patched_qemu`` -- a factory for launched :class:`Machine` s running the
  patched binary of ``qemu_version`` with ``-open-hook-fd``; by default served by the ``broker``
  fixture, or by a broker for ``policy=`` or ``broker=`` you give::

      def test_read(patched_qemu, broker, tmp_path):
          vm = patched_qemu("-drive", f"file={img},if=none,id=drive0")
          vm.qemu_io("drive0", "read -P 0xab 0 512")
          assert any(r.path == str(img) for r in broker.records)

  ``hook=False`` runs the patched binary without the option;
  ``serve=False, launch=False`` leaves the hook to you (for example
  ``vm.start_open_hook_server(...)``, then ``vm.launch()``); any other
  keyword goes to :class:`MachineConfig`.  Missing build: skipped locally,
  a failure under ``CI=true``.
* ``stock_qemu`` -- the same factory for the version's stock binary (Debian's
  for 7.2, the unpatched build of the same source for 10.0; never hooked).

Every machine is shut down at the end of the test.  QEMU's log is
``tmp_path/qemu-N.log``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

from testbed.broker import Broker, Policy
from testbed.errors import QEMUUsageError
from testbed.pytest_plugin import require
from testbed.qemu.binaries import build_hint, is_runnable, qemu_binary
from testbed.qemu.commandline import MachineConfig
from testbed.qemu.machine import Machine
from testbed.qemu.versions import Kind, get, parse_versions


def version_names() -> list[str]:
    """The versions tests run against: ``$QEMU_VERSIONS`` (as for make), else every one."""
    return [v.name for v in parse_versions(os.environ.get("QEMU_VERSIONS"))]


def version_id(name: str) -> str:
    return f"qemu{name}"


def require_binary(version: str, kind: Kind) -> Path:
    """``version``'s ``kind`` binary; skip (locally) or fail (CI) if it is not built."""
    binary = qemu_binary(version, kind)
    require(
        is_runnable(binary),
        f"QEMU {version} {kind.value} {binary} ({build_hint(get(version), kind)})",
    )
    return binary


class MachineFactory(Protocol):
    def __call__(
        self,
        *args: str,
        policy: Policy | None = ...,
        broker: Broker | None = ...,
        hook: bool = ...,
        serve: bool = ...,
        launch: bool = ...,
        **config: Any,
    ) -> Machine: ...


@dataclass
class _Machines:
    tmp_path: Path
    machines: list[Machine] = field(default_factory=list)
    counter: Iterator[int] = field(default_factory=itertools.count)

    def new(
        self, config: MachineConfig, *, launch: bool, policy: Policy | None, broker: Broker | None
    ) -> Machine:
        vm = Machine(config)
        self.machines.append(vm)
        if config.hook:
            if policy is not None:
                vm.start_broker(policy)
            elif broker is not None:
                broker.add_connection(vm.take_hook_socket())
        if launch:
            vm.launch()
        return vm

    def log_path(self) -> Path:
        return self.tmp_path / f"qemu-{next(self.counter)}.log"

    def shutdown_all(self) -> None:
        for vm in self.machines:
            vm.shutdown()


def grant_tmp_path(tmp_path: Path) -> Policy:
    """The default policy: everything beneath the test's directory, creation included."""
    return Policy.from_grants(create=[tmp_path])


@pytest.fixture(params=version_names(), ids=version_id)
def qemu_version(request: pytest.FixtureRequest) -> str:
    """The QEMU version this test runs against ("7.2", "10.0")."""
    name = request.param
    assert isinstance(name, str)
    return name


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(grant_tmp_path(tmp_path), audit_path=tmp_path / "audit.jsonl")
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def patched_qemu(
    request: pytest.FixtureRequest, tmp_path: Path, qemu_version: str
) -> Iterator[MachineFactory]:
    binary = require_binary(qemu_version, Kind.PATCHED)
    machines = _Machines(tmp_path)

    def make(
        *args: str,
        policy: Policy | None = None,
        broker: Broker | None = None,
        hook: bool = True,
        serve: bool = True,
        launch: bool = True,
        **config: Any,
    ) -> Machine:
        if hook and serve and policy is None and broker is None:
            broker = request.getfixturevalue("broker")
        config.setdefault("log_path", machines.log_path())
        cfg = MachineConfig(binary=binary, args=args, hook=hook, **config)
        return machines.new(cfg, launch=launch, policy=policy, broker=broker)

    try:
        yield make
    finally:
        machines.shutdown_all()


@pytest.fixture
def stock_qemu(tmp_path: Path, qemu_version: str) -> Iterator[MachineFactory]:
    binary = require_binary(qemu_version, Kind.STOCK)
    machines = _Machines(tmp_path)

    def make(
        *args: str,
        policy: Policy | None = None,
        broker: Broker | None = None,
        hook: bool = False,
        serve: bool = True,
        launch: bool = True,
        **config: Any,
    ) -> Machine:
        if hook or policy is not None or broker is not None:
            raise QEMUUsageError("stock QEMU has no -open-hook-fd: use patched_qemu")
        config.setdefault("log_path", machines.log_path())
        cfg = MachineConfig(binary=binary, args=args, **config)
        return machines.new(cfg, launch=launch, policy=None, broker=None)

    try:
        yield make
    finally:
        machines.shutdown_all()
