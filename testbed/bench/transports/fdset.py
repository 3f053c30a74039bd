"""Through fd sets, as libvirt passes a chain: one ``-add-fd`` set per layer.

The harness plays libvirt: it opens every layer (the top read-write and
read-only, the others read-only) before QEMU starts, passes each as its own
fd set with ``-add-fd``, and spells the whole chain out in ``-blockdev``
with every layer's file named ``/dev/fdset/N`` (QEMU cannot follow a stored
backing name into an fd set).  Files handed over later (a ``blockdev-add``
image, a snapshot overlay, created empty beforehand as libvirt does) get
their sets at start too.  Opening and reading the chain is libvirt's work
before the spawn, so it is not in the start-up time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from testbed.bench.chain import Chain
from testbed.bench.qemurun import Launch
from testbed.bench.transports import Services, Transport, close_all, flat_chain_args

FIRST_SET = 10


class FdSet(Transport):
    name = "fdset"
    what = "fd sets: -add-fd per layer, the chain spelled out as /dev/fdset/N"

    def launch(
        self, services: Services, chain: Chain | None, later: Sequence[Path] = (), *, version: str
    ) -> Launch:
        fds: list[int] = []
        args: list[str] = []
        names: dict[Path, str] = {}
        next_set = FIRST_SET

        def add(path: Path, *modes: int) -> str:
            nonlocal next_set
            for flags in modes:
                fd = os.open(path, flags)  # inheritable: QEMU gets it at spawn
                fds.append(fd)
                args.extend(["-add-fd", f"fd={fd},set={next_set}"])
            name = f"/dev/fdset/{next_set}"
            next_set += 1
            return name

        try:
            layer_names = []
            if chain is not None:
                for i, layer in enumerate(chain.layers):
                    modes = (os.O_RDWR, os.O_RDONLY) if i == 0 else (os.O_RDONLY,)
                    layer_names.append(add(layer, *modes))
            for path in later:
                names[path] = add(path, os.O_RDWR, os.O_RDONLY)
        except OSError:
            close_all(fds)
            raise
        if chain is not None:
            args.extend(flat_chain_args(layer_names))
        return Launch(
            args=tuple(args), pass_fds=tuple(fds), names=names,
            spawned=lambda: close_all(fds),
        )  # fmt: skip


PART = FdSet()
