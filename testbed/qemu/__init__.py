"""Driving a real QEMU, stock or patched with the -open-hook-fd series.

* :mod:`testbed.qemu.binaries` -- where the stock and patched binaries are;
* :mod:`testbed.qemu.commandline` -- the frozen :class:`MachineConfig` and the
  argv built from it (pure, no processes);
* :mod:`testbed.qemu.machine` -- :class:`Machine`: launch, QMP, HMP, brokers on
  the hook socket, shutdown;
* :mod:`testbed.qemu.fixtures` -- pytest fixtures (``broker``, ``patched_qemu``,
  ``stock_qemu``);
* :mod:`testbed.qemu.command` -- the ``testbed qemu`` subcommand.
"""

from testbed.qemu.binaries import STOCK_QEMU, open_hook_server_path, patched_qemu_path
from testbed.qemu.commandline import FIRMWARE_DIRS, MachineConfig
from testbed.qemu.machine import Machine, QMPCommandError

__all__ = [
    "FIRMWARE_DIRS",
    "STOCK_QEMU",
    "Machine",
    "MachineConfig",
    "QMPCommandError",
    "open_hook_server_path",
    "patched_qemu_path",
]
