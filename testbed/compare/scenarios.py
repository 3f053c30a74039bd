"""The scenario matrix: an image, how it is attached, what is done to it.

A scenario names an image recipe (``images/manifest.d``), an attachment and
a list of operations.  The matrix is built from a few small tables below,
not written out scenario by scenario; ``testbed compare --list`` prints it.

Attachments (QEMU command line; the model does the same through
:class:`testbed.block` calls):

``drive``        ``-drive file=...,if=none,id=drive0`` on ``-machine none``: no device,
                 so ``auto-read-only`` keeps the image read-only
``drive-device`` the same plus ``-device virtio-blk-pci,drive=drive0`` on ``-machine pc``
                 (``-S``): the device takes write permission, the image goes read-write
``blockdev``     ``-blockdev driver=FMT,node-name=drive0,file.driver=file,...``:
                 read-write at once, no protocol probe
``hotplug``      nothing on the command line; ``blockdev-add`` at run time

Options: ``read-only=on``, ``cache.direct=on`` (``O_DIRECT``), ``rw`` (vvfat's
``fat:rw:`` write mode).

Operations, in order: ``add`` / ``del`` (``blockdev-add`` / ``blockdev-del``,
hotplug only), ``read`` (a guest-side read of the first MiB, HMP
``qemu-io``), ``snapshot-qmp`` (``blockdev-snapshot-sync``),
``snapshot-hmp`` (HMP ``snapshot_blkdev``), ``snapshot-existing``
(``blockdev-snapshot-sync mode=existing`` onto an overlay made beforehand
with ``qemu-img``), ``quit`` (the drop back to read-only).

Grants (the broker's policy for the scenario directory ``D``):
``create`` (everything under ``D``), ``ro`` (read-only grant on ``D``: QEMU's
write opens are refused), ``main`` (a read-write grant on the image's
main file only: its backing file lies outside the grant).  A scenario with
a grant other than ``create`` carries the tag ``refusal``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

ATTACHES = ("drive", "drive-device", "blockdev", "hotplug")
OPERATIONS = ("add", "read", "snapshot-qmp", "snapshot-hmp", "snapshot-existing", "del", "quit")
GRANTS = ("create", "ro", "main")

#: The overlay every snapshot operation creates, relative to the scenario directory.
OVERLAY = "snap.qcow2"
#: What a ``read`` operation reads: (offset, length).
READ_SPAN = (0, 1 << 20)


@dataclass(frozen=True, kw_only=True)
class Scenario:
    name: str
    image: str
    attach: str
    operations: tuple[str, ...]
    read_only: bool = False
    cache_direct: bool = False
    vvfat_rw: bool = False
    grant: str = "create"
    tags: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.attach not in ATTACHES:
            raise ValueError(
                f"scenario {self.name}: attach {self.attach!r} is not one of {', '.join(ATTACHES)}"
            )
        for op in self.operations:
            if op not in OPERATIONS:
                raise ValueError(f"scenario {self.name}: unknown operation {op!r}")
        if self.grant not in GRANTS:
            raise ValueError(
                f"scenario {self.name}: grant {self.grant!r} is not one of {', '.join(GRANTS)}"
            )
        if (self.attach == "hotplug") != ("add" in self.operations):
            raise ValueError(f"scenario {self.name}: 'add' goes with attach=hotplug, and only")
        if not self.operations or self.operations[-1] != "quit":
            raise ValueError(f"scenario {self.name}: the last operation must be 'quit'")
        if "/" in self.name or ":" in self.name or "," in self.name:
            raise ValueError(
                f"scenario name {self.name!r} has '/', ':' or ',' "
                "(it becomes a directory inside QEMU file names)"
            )

    @property
    def snapshots(self) -> bool:
        return any(op.startswith("snapshot") for op in self.operations)


def _name(image: str, attach: str, opts: list[str], ops: tuple[str, ...], grant: str) -> str:
    parts = [image, attach + "".join(f"+{o}" for o in opts)]
    shown = [op for op in ops if op not in ("add", "del", "quit")]
    parts.append("-".join(shown) if shown else "open")
    if grant != "create":
        parts.append(f"grant-{grant}")
    return "_".join(parts)


def scenario(
    image: str,
    attach: str,
    ops: tuple[str, ...] = ("read",),
    *,
    read_only: bool = False,
    cache_direct: bool = False,
    vvfat_rw: bool = False,
    grant: str = "create",
    tags: tuple[str, ...] = (),
) -> Scenario:
    """A scenario with its name made from its parts; ``quit`` (and add/del) appended."""
    full = ops
    if attach == "hotplug":
        full = ("add", *ops, "del")
    full = (*full, "quit")
    opts = [o for o, on in (("ro", read_only), ("direct", cache_direct), ("rw", vvfat_rw)) if on]
    all_tags = set(tags) | ({"refusal"} if grant != "create" else set())
    if image.startswith("vvfat"):
        all_tags.add("vvfat")
    return Scenario(
        name=_name(image, attach, opts, ops, grant),
        image=image,
        attach=attach,
        operations=full,
        read_only=read_only,
        cache_direct=cache_direct,
        vvfat_rw=vvfat_rw,
        grant=grant,
        tags=frozenset(all_tags),
    )


#: Every format and subformat the model supports (one image each, chains of depth 1-3).
IMAGES = (
    "raw",
    "qcow2-v3", "qcow2-v2", "qcow2-compressed", "qcow2-data-file",
    "qcow2-chain1", "qcow2-chain2-subdir", "qcow2-chain3-nofmt",
    "vmdk-monolithicSparse", "vmdk-monolithicFlat", "vmdk-twoGbMaxExtentSparse",
    "vmdk-twoGbMaxExtentFlat", "vmdk-streamOptimized", "vmdk-vmfs", "vmdk-vmfsSparse",
    "vmdk-chain",
    "vpc-fixed", "vpc-dynamic",
    "vdi-static", "vdi-dynamic",
)  # fmt: skip
#: vvfat trees: read-only, and one in rw mode (``fat:rw:``).
VVFAT = ("vvfat-floppy", "vvfat-fat16")
VVFAT_RW = "vvfat-fat16"


def build_matrix() -> list[Scenario]:
    m: list[Scenario] = []
    # every image: -drive without a device (stays read-only), and with one (goes read-write)
    for image in IMAGES:
        m.append(scenario(image, "drive"))
    m += [scenario(image, "drive") for image in VVFAT]
    m.append(scenario(VVFAT_RW, "drive", vvfat_rw=True))
    m.append(scenario(VVFAT_RW, "drive-device", vvfat_rw=True))
    for image in IMAGES:
        m.append(scenario(image, "drive-device"))
    # -blockdev, read-only=on, cache.direct=on
    for image in ("raw", "qcow2-chain1", "vmdk-twoGbMaxExtentFlat", "vpc-dynamic", "vdi-static"):
        m.append(scenario(image, "blockdev"))
    for image in ("raw", "qcow2-chain2-subdir", "vmdk-monolithicFlat"):
        m.append(scenario(image, "blockdev", read_only=True))
    m.append(scenario("qcow2-chain1", "drive", read_only=True))
    for image in ("raw", "qcow2-chain1"):
        m.append(scenario(image, "blockdev", cache_direct=True))
    m.append(scenario("qcow2-v3", "drive-device", cache_direct=True))
    # live snapshots
    for op in ("snapshot-qmp", "snapshot-hmp", "snapshot-existing"):
        m.append(scenario("qcow2-chain1", "drive-device", ("read", op)))
    m.append(scenario("raw", "drive-device", ("snapshot-qmp",)))
    m.append(scenario("vmdk-twoGbMaxExtentFlat", "drive-device", ("snapshot-qmp",)))
    m.append(scenario("qcow2-v3", "blockdev", ("snapshot-qmp",)))
    # blockdev-add / blockdev-del at run time
    for image in ("raw", "qcow2-chain2-subdir", "vmdk-twoGbMaxExtentSparse", "vdi-dynamic"):
        m.append(scenario(image, "hotplug"))
    # refusals: a backing file outside the grant, a read-only grant where QEMU wants write
    m.append(scenario("qcow2-chain1", "hotplug", grant="main"))
    m.append(scenario("raw", "hotplug", grant="ro"))
    m.append(scenario("qcow2-chain1", "drive-device", grant="ro"))
    m.append(scenario("raw", "drive", grant="ro"))
    names = [s.name for s in m]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"duplicate scenario names: {sorted(dupes)}")
    return m


def select(matrix: list[Scenario], patterns: list[str]) -> list[Scenario]:
    """The scenarios whose name matches any of the glob ``patterns`` (all if none)."""
    if not patterns:
        return list(matrix)
    chosen = [s for s in matrix if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]
    if not chosen:
        raise ValueError(f"no scenario matches {' or '.join(patterns)} (see --list)")
    return chosen
