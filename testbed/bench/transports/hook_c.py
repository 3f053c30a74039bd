"""Through the hook, served by the series' C example server (patch 0005), one per QEMU.

``open-hook-server --fd N`` serves one socket, so each QEMU gets its own,
started before QEMU and known to be serving (one request answered) before
the clock starts, as a broker daemon's would be.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from testbed.bench.chain import Chain
from testbed.bench.qemurun import Launch
from testbed.bench.qemus import find_open_hook_server, missing
from testbed.bench.transports import Services, Transport, blockdev_args, chain_node, serving_launch
from testbed.errors import UnknownPartError


class HookC(Transport):
    name = "hook_c"
    what = "-open-hook-fd to contrib/open-hook-server (C), one per QEMU"

    def unavailable(self, version: str) -> str | None:
        try:
            server = find_open_hook_server(version)
        except UnknownPartError as err:
            return str(err)
        return super().unavailable(version) or missing(server, f"open-hook-server {version}")

    def launch(
        self, services: Services, chain: Chain | None, later: Sequence[Path] = (), *, version: str
    ) -> Launch:
        binary = find_open_hook_server(version)
        root = str(services.root)
        argv = [str(binary), "--root", root, "--log", "/dev/null", "--fd", "{fd}"]
        return serving_launch(argv, root, blockdev_args(chain_node(chain)) if chain else ())


PART = HookC()
