"""Through the hook, served by the Python floor, one per QEMU: ``blockdev`` only.

The floor (:mod:`testbed.bench.pyfloor`) issues the broker's system calls
per request and nothing else, so ``qemu_hook_floor_vs_path`` is what the
leanest Python loop doing the hardened open costs a ``blockdev-add``, and
``qemu_hook_vs_hook_floor`` what the broker's own code adds to that inside
QEMU's open path (``broker_cpu_vs_python_floor`` is the same comparison in
a ping-pong).  The floor answers every request with the program's flags
(read-only, as traced), so it serves only the ``blockdev`` experiment, whose
node is read-only; a chain's read-write top would get the wrong descriptor.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from testbed.bench.chain import Chain
from testbed.bench.qemurun import Launch
from testbed.bench.servers import floor_argv
from testbed.bench.transports import Services, Transport, serving_launch
from testbed.errors import BenchUsageError


class HookFloor(Transport):
    name = "hook_floor"
    what = "-open-hook-fd to the Python floor (the broker's system calls alone), one per QEMU"
    experiments: ClassVar[frozenset[str] | None] = frozenset({"blockdev"})

    def unavailable_in(self, services: Services) -> str | None:
        env = services.env
        return None if env.floor_program else f"no program for the floor: {env.floor_error}"

    def launch(
        self, services: Services, chain: Chain | None, later: Sequence[Path] = (), *, version: str
    ) -> Launch:
        if not later:
            raise BenchUsageError("hook_floor serves the files handed over later; none given")
        return serving_launch(floor_argv(services.env, root=services.root), later[0])


PART = HookFloor()
