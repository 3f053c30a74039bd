"""Driving a real QEMU of any registered version, stock or patched with the -open-hook-fd series.

Getting a binary -- the one call every part uses::

    from testbed.qemu import qemu_binary

    qemu_binary("10.0", "patched")            # build/qemu/10.0/patched/bin/qemu-system-x86_64
    qemu_binary("10.0", "stock")              # the same source built without the series
    qemu_binary("7.2", "stock")               # /usr/bin/qemu-system-x86_64 (Debian's)
    qemu_binary("7.2", "open-hook-server")    # the series' C example broker
    qemu_binary("10.0", "patched", program="qemu-img")   # also qemu-io, qemu-nbd,
                                                         # qemu-storage-daemon
    qemu_binary("10.0", "patched", must_exist=True)      # MissingBuildError if not built

``version`` is a name of :data:`testbed.qemu.versions.VERSIONS` ("7.2",
"10.0"; None means the default, 7.2), ``kind`` a :class:`Kind` or its value.
An unknown version or kind raises :class:`~testbed.errors.QemuVersionError`.
``testbed.qemu.versions.parse_versions("7.2,10.0")`` turns a
``--qemu-version`` value into registry entries (empty: every version), and
:func:`built_versions` says which ones ``make qemu`` has built.

The helpers from before versions existed still work and mean 7.2:
:data:`STOCK_QEMU`, :func:`patched_qemu_path`, :func:`open_hook_server_path`
(and ``binaries.build_dir``/``binaries.cache_key``).

Modules:

* :mod:`testbed.qemu.versions` -- the registry: one :class:`QemuVersion` per
  version (Debian source, series directory, how it is built);
* :mod:`testbed.qemu.binaries` -- :func:`qemu_binary` and ``testbed qemu info``'s
  :func:`~testbed.qemu.binaries.describe`;
* :mod:`testbed.qemu.commandline` -- the frozen :class:`MachineConfig` and the
  argv built from it (pure, no processes);
* :mod:`testbed.qemu.machine` -- :class:`Machine`: launch, QMP, HMP, brokers on
  the hook socket, shutdown;
* :mod:`testbed.qemu.fixtures` -- pytest fixtures (``qemu_version``,
  ``broker``, ``patched_qemu``, ``stock_qemu``), one run per version;
* :mod:`testbed.qemu.command` -- the ``testbed qemu`` subcommand.
"""

from testbed.errors import QMPCommandError
from testbed.qemu.binaries import (
    STOCK_QEMU,
    built_versions,
    open_hook_server_path,
    patched_qemu_path,
    qemu_binary,
)
from testbed.qemu.commandline import FIRMWARE_DIRS, MachineConfig
from testbed.qemu.machine import Machine
from testbed.qemu.versions import DEFAULT_VERSION, VERSIONS, Kind, QemuVersion

__all__ = [
    "DEFAULT_VERSION",
    "FIRMWARE_DIRS",
    "STOCK_QEMU",
    "VERSIONS",
    "Kind",
    "Machine",
    "MachineConfig",
    "QMPCommandError",
    "QemuVersion",
    "built_versions",
    "open_hook_server_path",
    "patched_qemu_path",
    "qemu_binary",
]
