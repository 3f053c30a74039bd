"""Through the hook, served by the series' C example server (patch 0005), one per QEMU.

``open-hook-server --fd N`` serves one socket, so each QEMU gets its own,
started before QEMU and known to be serving (one request answered) before
the clock starts, as a broker daemon's would be.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path

from testbed.bench.brokerload import SpawnedServer
from testbed.bench.chain import Chain
from testbed.bench.client import one_op
from testbed.bench.qemurun import Launch
from testbed.bench.qemus import find_open_hook_server, missing
from testbed.bench.transports import Services, Transport, blockdev_args, chain_node
from testbed.errors import UnknownPartError
from testbed.protocol import encode_request


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
        server = SpawnedServer(argv, cpu=None)
        fd = server.client_fd
        assert fd is not None
        probe = socket.socket(fileno=os.dup(fd))
        try:
            probe.settimeout(10)
            one_op(probe, encode_request(root, os.O_RDONLY, 0))  # serving: the clock may start
        finally:
            probe.close()
        return Launch(
            args=blockdev_args(chain_node(chain)) if chain else (),
            hook_fd=fd,
            spawned=server.release_client,
            finished=server.stop,
        )


PART = HookC()
