"""How long and how often: the full plan of ``make bench`` and ``--quick``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from testbed.bench.placement import Placement
from testbed.bench.qemus import DEFAULT_VERSION


@dataclass(frozen=True, kw_only=True)
class Plan:
    reps: int  # interleaved repetitions of every comparison
    seconds: float  # one ping-pong / sweep round
    warmup: int  # ops before a client's rounds count
    clients: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    qmp_ops: int = 300  # add-fd + remove-fd per repetition
    blockdev_ops: int = 200  # blockdev-add + blockdev-del per repetition
    blockdev_cpu_ops: int = 50  # the same, per repetition of blockdev's CPU pass (0: none)
    depths: tuple[int, ...] = (1, 4, 16, 64)
    starts_per_cell: int = 9  # QEMU starts per (depth, transport) per repetition
    storm_sizes: tuple[int, ...] = (1, 4, 16)
    storm_depth: int = 4
    snapshot_depth: int = 4
    #: QEMU versions, the first is the run's primary one: blockdev and handover run on
    #: every one (interleaved), the other QEMU experiments on the first
    qemu_versions: tuple[str, ...] = (DEFAULT_VERSION,)
    #: where the harness, QEMU and its broker run for blockdev, startup and snapshot
    #: (the storm and the handover are always unpinned): one core, because on
    #: these virtual machines waking an idle vCPU costs more than the hook's work
    qemu_placement: Placement = Placement.SAME_CORE
    #: blockdev also unpinned (information ratios), when qemu_placement is not
    blockdev_unpinned: bool = True
    experiments: tuple[str, ...] | None = None  # None: all
    transports: tuple[str, ...] | None = None  # QEMU transports; None: all registered

    @property
    def qemu_version(self) -> str:
        """The primary version: the plain ratio keys are its, ``KEY@V`` the others'."""
        return self.qemu_versions[0]

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["qemu_placement"] = self.qemu_placement.value
        return d


FULL = Plan(reps=7, seconds=1.0, warmup=1000)
QUICK = Plan(
    reps=3, seconds=0.2, warmup=200, clients=(1, 64), qmp_ops=60, blockdev_ops=40,
    blockdev_cpu_ops=10, starts_per_cell=1, blockdev_unpinned=False,
)  # fmt: skip
