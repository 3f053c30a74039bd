"""By path: QEMU opens every file itself (the patched binary without -open-hook-fd).

The same binary as the hook transports, so a ratio to this row measures
who opens the files and nothing else (Debian's own binary is ``path_debian``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from testbed.bench.chain import Chain
from testbed.bench.qemurun import Launch
from testbed.bench.transports import Services, Transport, blockdev_args, chain_node


class ByPath(Transport):
    name = "path"
    what = "QEMU opens by path (patched build, no -open-hook-fd)"

    def launch(
        self, services: Services, chain: Chain | None, later: Sequence[Path] = (), *, version: str
    ) -> Launch:
        return Launch(args=blockdev_args(chain_node(chain)) if chain else ())


PART = ByPath()
