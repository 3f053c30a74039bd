"""By path in Debian's own QEMU 7.2 (information: a different build from the patched one)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from testbed.bench.chain import Chain
from testbed.bench.qemurun import Launch
from testbed.bench.qemus import Build
from testbed.bench.transports import Services, Transport, blockdev_args, chain_node


class ByPathDebian(Transport):
    name = "path_debian"
    what = "QEMU opens by path (Debian's qemu-system-x86_64)"
    build = Build.STOCK

    def launch(
        self, services: Services, chain: Chain | None, later: Sequence[Path] = (), *, version: str
    ) -> Launch:
        return Launch(args=blockdev_args(chain_node(chain)) if chain else ())


PART = ByPathDebian()
