"""Through the hook: every open goes to one ``testbed broker --socket`` daemon.

Each QEMU gets its own connection to the daemon as ``-open-hook-fd``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from testbed.bench.chain import Chain
from testbed.bench.qemurun import Launch
from testbed.bench.transports import Services, Transport, blockdev_args, chain_node


class Hook(Transport):
    name = "hook"
    what = "-open-hook-fd to the Python broker (one daemon, a connection per QEMU)"

    def launch(
        self, services: Services, chain: Chain | None, later: Sequence[Path] = (), *, version: str
    ) -> Launch:
        sock = services.connect()
        return Launch(
            args=blockdev_args(chain_node(chain)) if chain else (),
            hook_fd=sock.fileno(),
            spawned=sock.close,
            server=services.broker(),
        )


PART = Hook()
