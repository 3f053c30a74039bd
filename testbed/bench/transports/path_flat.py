"""By path, but with the chain spelled out node by node as the ``fdset`` transport does.

Information: the difference to ``fdset`` is the fd sets themselves; the
difference to ``path`` is spelling the chain out (libvirt's flat
``-blockdev`` nodes) instead of letting QEMU follow the stored backing names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from testbed.bench.chain import Chain
from testbed.bench.qemurun import Launch
from testbed.bench.transports import Services, Transport, flat_chain_args


class ByPathFlat(Transport):
    name = "path_flat"
    what = "QEMU opens by path, the chain given as flat -blockdev nodes (as for fd sets)"

    def launch(
        self, services: Services, chain: Chain | None, later: Sequence[Path] = (), *, version: str
    ) -> Launch:
        return Launch(args=flat_chain_args([str(p) for p in chain.layers]) if chain else ())


PART = ByPathFlat()
