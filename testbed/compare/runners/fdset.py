"""Oracle 3: upstream's fd sets, with the testbed playing libvirt.

Before QEMU needs them, the files libvirt would know about are opened here
and handed over with QMP ``add-fd`` (one fd set per file, an ``O_RDONLY``
and, unless the grant is read-only, an ``O_RDWR`` member), and QEMU is told
``/dev/fdset/N`` instead of the path: the image's main file, and for a
snapshot the overlay, created empty beforehand as libvirt does.  Nothing
else is rewritten: backing files, vmdk extents and vvfat's host files are
found by QEMU by name, which is exactly where the design cannot follow.
The result is whether every operation worked, and QEMU's error if not.
"""

from __future__ import annotations

import contextlib
import os

from testbed.compare.runners.common import (
    OracleResult,
    Setup,
    machine_type,
    qemu_args,
    run_operation,
)
from testbed.errors import TestbedError
from testbed.qemu import STOCK_QEMU, Machine, MachineConfig
from testbed.qemu.binaries import is_runnable

MAIN_SET = 1
OVERLAY_SET = 2


def _add_fd(vm: Machine, fd: int, fdset: int) -> None:
    # Machine has no public add-fd yet: the fd rides SCM_RIGHTS on the QMP socket.
    vm._qmp.send_fd_scm(fd)
    vm.qmp("add-fd", **{"fdset-id": fdset})


def _modes(setup: Setup, path: str) -> list[int]:
    if os.path.isdir(path):
        return [os.O_RDONLY | os.O_DIRECTORY]
    if setup.scenario.grant == "ro" or setup.scenario.read_only:
        return [os.O_RDONLY]
    return [os.O_RDONLY, os.O_RDWR]


def run(setup: Setup) -> OracleResult:
    result = OracleResult()
    if not is_runnable(STOCK_QEMU):
        result.skipped = f"Debian's QEMU {STOCK_QEMU} is missing"
        return result
    sc = setup.scenario
    files = {MAIN_SET: str(setup.main)}
    if sc.snapshots:
        if "snapshot-existing" not in sc.operations:
            setup.overlay.touch()
        files[OVERLAY_SET] = str(setup.overlay)
    main = f"/dev/fdset/{MAIN_SET}"
    overlay = f"/dev/fdset/{OVERLAY_SET}"
    log = setup.logs / "fdset-qemu.log"
    log.unlink(missing_ok=True)
    boot_args = qemu_args(setup, main)
    # Command-line drives are opened before QMP exists: start paused on the
    # monitor (-S is not enough), so pass those fds with -add-fd instead.
    inherited: list[int] = []
    extra: list[str] = []
    fds: list[int] = []
    try:
        if boot_args:
            for fdset, path in files.items():
                if fdset != MAIN_SET:
                    continue
                for flags in _modes(setup, path):
                    fd = os.open(path, flags)  # inheritable on purpose: QEMU gets it
                    os.set_inheritable(fd, True)
                    fds.append(fd)
                    inherited.append(fd)
                    extra += ["-add-fd", f"fd={fd},set={fdset}"]
        config = MachineConfig(binary=STOCK_QEMU, machine=machine_type(sc),
                               args=(*extra, *boot_args), pass_fds=tuple(inherited),
                               log_path=log)
        vm = Machine(config)
        try:
            vm.launch()
        except TestbedError as err:
            result.operations.append(("launch", _first_line(vm, err)))
            vm.shutdown()
            return result
        result.operations.append(("launch", "ok"))
        try:
            for fdset, path in files.items():
                if fdset == MAIN_SET and boot_args:
                    continue
                for flags in _modes(setup, path):
                    fd = os.open(path, flags | os.O_CLOEXEC)
                    fds.append(fd)
                    _add_fd(vm, fd, fdset)
            for op in sc.operations:
                result.operations.append(
                    (op, run_operation(vm, setup, op, overlay=overlay, main=main)))
        finally:
            vm.shutdown()
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    result.log = str(log)
    return result


def _first_line(vm: Machine, err: TestbedError) -> str:
    for line in vm.read_log().splitlines():
        if "qemu-system" in line:
            return line.strip()[:400]
    return str(err).splitlines()[0]
