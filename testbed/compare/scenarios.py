"""Scenarios: an image, how QEMU is given it, the grant, and the steps that follow.

A :class:`Scenario` is what every oracle runs: a corpus image
(``images/manifest.d``) and/or a recipe of shell commands, QEMU options
(``args``), a machine type, the broker's grant and a list of
:class:`~testbed.compare.steps.Step`.  In ``args``, steps and the recipe,
``$D`` is the scenario's directory (a fresh copy per oracle), ``$IMAGE``
the corpus image's main file (``fat:...`` for vvfat) and ``$FORMAT`` its
format as QEMU is told it.

The built-in matrix is generated from the small tables below (``testbed
compare --list``; ``--dump-scenarios DIR`` writes it in the scenario-file
format of :mod:`testbed.compare.scenario_file`).  Its attachments:

``drive``        ``-drive file=...,if=none,id=drive0`` on ``-machine none``: no device,
                 so ``auto-read-only`` keeps a raw image read-only
``drive-device`` the same plus ``-device virtio-blk-pci,drive=drive0`` on ``-machine pc``
                 (``-S``): the device takes write permission
``blockdev``     ``-blockdev driver=FMT,node-name=drive0,file.driver=file,...``
``hotplug``      nothing on the command line; ``blockdev-add`` at run time
``node-refs``    ``blockdev-add`` of a ``file`` node, then a format node naming it
``file-node``    ``-blockdev`` of a read-only ``file`` node and a format node over it
``json``         ``-drive file=json:{...}`` with a device
``snapshot-on``  ``-drive ...,snapshot=on`` with a device (the temporary overlay)
``snapshot``     ``-snapshot`` and a ``-drive`` with a device
``cdrom``        an empty ``ide-cd`` whose medium the steps change

Grants (the broker's policy for the scenario directory ``D``): ``create``
(everything under ``D``), ``ro`` (read-only grant on ``D``), ``main`` (a
read-write grant on the image's main file only).  A scenario with a grant
other than ``create`` carries the tag ``refusal``.
"""

from __future__ import annotations

import enum
import fnmatch
import re
from dataclasses import dataclass, field

from testbed.compare.attach import DRIVE, EXERCISED, TEMPORARY_OVERLAY, AttachMode
from testbed.compare.attach import attach_args as attach_args  # re-exported
from testbed.compare.ops import Op, OpContext, all_operations, get
from testbed.compare.ops.hotplug import add_args
from testbed.compare.steps import QUIT, Step, StepKind, qmp
from testbed.errors import ScenarioError

#: The overlay every snapshot operation creates, relative to the scenario directory.
OVERLAY = "snap.qcow2"


class Grant(enum.StrEnum):
    CREATE = "create"
    RO = "ro"
    MAIN = "main"


GRANTS = tuple(g.value for g in Grant)


class Tag(enum.StrEnum):
    """What a scenario's tags say to the oracles, the comparator and the known divergences."""

    #: The grant refuses an open: the traces differ after it (a known divergence).
    REFUSAL = "refusal"
    #: The image is a vvfat directory tree.
    VVFAT = "vvfat"
    #: ... in rw mode (``fat:rw:``), whose write target lives in /var/tmp.
    VVFAT_RW = "vvfat-rw"
    #: ``TMPDIR`` is inside the scenario directory (``-snapshot``'s overlay).
    TMPDIR = "tmpdir"


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")


@dataclass(frozen=True, kw_only=True)
class Scenario:
    name: str
    #: A corpus image (its directory is copied), or "" for a recipe-only scenario.
    image: str
    steps: tuple[Step, ...]
    args: tuple[str, ...] = ()
    machine: str = "none"
    recipe: tuple[str, ...] = ()
    #: The main image file relative to ``$D`` (default: the corpus image's).
    main: str = ""
    #: ``$FORMAT`` (default: the corpus image's format; raw for vvfat).
    format: str = ""
    grant: Grant = Grant.CREATE
    #: What the scenario exercises: the per-operation summary groups by it.
    operation: str = "open"
    #: How the image is attached (a label: ``drive-device``, ``json``, ...).
    attach: str = "custom"
    tags: frozenset[str] = field(default_factory=frozenset)
    #: Where it was defined: ``built-in`` or ``FILE:LINE``.
    source: str = "built-in"

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or "/" in self.name or ":" in self.name:
            raise ScenarioError(
                f"scenario name {self.name!r}: letters, digits and _.+=- only "
                "(it becomes a directory inside QEMU file names)"
            )
        if not self.image and not self.recipe:
            raise ScenarioError(f"scenario {self.name}: give an image, a recipe, or both")
        if not self.image and not self.main:
            raise ScenarioError(
                f"scenario {self.name}: a recipe-only scenario must name its main file"
            )
        if not self.steps or self.steps[-1].kind is not StepKind.QUIT:
            raise ScenarioError(f"scenario {self.name}: the last step must be quit")
        if any(s.kind is StepKind.QUIT for s in self.steps[:-1]):
            raise ScenarioError(f"scenario {self.name}: quit may only be the last step")

    @property
    def operations(self) -> tuple[str, ...]:
        """The step labels, for reports."""
        return tuple(s.label for s in self.steps)


@dataclass(frozen=True, kw_only=True)
class Layers:
    """QEMU's names for an image's layers, for commit and stream (``$D``-relative)."""

    mid: str = ""
    bottom: str = ""
    backing_name: str = ""


#: The chains the jobs run on: second layer, lowest layer, and the lowest's stored name.
CHAINS: dict[str, Layers] = {
    "qcow2-chain1": Layers(mid="", bottom="$D/base.raw", backing_name="base.raw"),
    "qcow2-chain2-subdir": Layers(
        mid="$D/top/../mid/mid.qcow2",
        bottom="$D/top/../mid/../base/base.raw",
        backing_name="../base/base.raw",
    ),
    "qcow2-chain3-nofmt": Layers(mid="$D/l2.qcow2", bottom="$D/base.raw", backing_name="base.raw"),
}


def _node_ref_steps(ctx: OpContext) -> tuple[tuple[Step, ...], tuple[Step, ...]]:
    add = (
        qmp("blockdev-add", driver="file", **{"node-name": "file0"}, filename="$IMAGE"),
        qmp("blockdev-add", driver="$FORMAT", **{"node-name": DRIVE}, file="file0"),
    )
    remove = (
        qmp("blockdev-del", **{"node-name": DRIVE}),
        qmp("blockdev-del", **{"node-name": "file0"}),
    )
    return add, remove


def _context(image: str, attach: AttachMode, *, read_only: bool, cache_direct: bool) -> OpContext:
    layers = CHAINS.get(image, Layers())
    return OpContext(
        attach=attach,
        mid=layers.mid,
        bottom=layers.bottom,
        backing_name=layers.backing_name,
        read_only=read_only,
        cache_direct=cache_direct,
    )


def _around(attach: AttachMode, ctx: OpContext) -> tuple[tuple[Step, ...], tuple[Step, ...]]:
    """The steps that add the image before the operations and remove it after (hotplug)."""
    if attach is AttachMode.HOTPLUG:
        return (qmp("blockdev-add", **add_args(ctx)),), (
            qmp("blockdev-del", **{"node-name": DRIVE}),
        )
    if attach is AttachMode.NODE_REFS:
        return _node_ref_steps(ctx)
    return (), ()


def _operation_steps(
    attach: AttachMode, ops: tuple[str, ...], ctx: OpContext
) -> tuple[list[Step], list[str]]:
    """The steps and the recipe of ``ops``, each checked to go with ``attach``."""
    steps: list[Step] = []
    recipe: list[str] = []
    for name in ops:
        op = get(name)
        if op.attaches and attach not in op.attaches:
            raise ScenarioError(f"operation {name} does not go with attach {attach}")
        steps += op.steps(ctx)
        recipe += op.recipe
    return steps, recipe


def _tags(
    image: str, attach: AttachMode, grant: Grant, tags: tuple[str, ...], vvfat_rw: bool
) -> frozenset[str]:
    out = set(tags)
    if grant is not Grant.CREATE:
        out.add(Tag.REFUSAL)
    if image.startswith("vvfat"):
        out.add(Tag.VVFAT)
    if vvfat_rw:
        out.add(Tag.VVFAT_RW)
    if attach in TEMPORARY_OVERLAY:
        out.add(Tag.TMPDIR)
    return frozenset(out)


def _name(
    image: str, attach: AttachMode, ops: tuple[str, ...], grant: Grant, options: dict[str, bool]
) -> str:
    """``<image>_<attach>[+ro][+direct][+rw]_<ops or open>[_grant-<grant>]``."""
    opts = "".join(f"+{o}" for o, on in options.items() if on)
    parts = [image, attach + opts, "-".join(ops) if ops else "open"]
    if grant is not Grant.CREATE:
        parts.append(f"grant-{grant}")
    return "_".join(parts)


def scenario(
    image: str,
    attach: AttachMode | str,
    ops: tuple[str, ...] = ("read",),
    *,
    read_only: bool = False,
    cache_direct: bool = False,
    vvfat_rw: bool = False,
    grant: Grant | str = Grant.CREATE,
    tags: tuple[str, ...] = (),
    label: str = "",
) -> Scenario:
    """A built-in scenario, its name made from its parts; add/del and quit around ``ops``."""
    how = AttachMode.of(attach)
    access = Grant(grant)
    ctx = _context(image, how, read_only=read_only, cache_direct=cache_direct)
    machine, args = attach_args(how, read_only=read_only, cache_direct=cache_direct)
    before, after = _around(how, ctx)
    steps, recipe = _operation_steps(how, ops, ctx)
    main_op = next((o for o in ops if o != Op.READ), "")
    options = {"ro": read_only, "direct": cache_direct, "rw": vvfat_rw}
    return Scenario(
        name=_name(image, how, ops, access, options),
        image=image,
        steps=(*before, *steps, *after, QUIT),
        args=args,
        machine=machine,
        recipe=tuple(recipe),
        grant=access,
        operation=label or main_op or (str(how) if how in EXERCISED else "open"),
        attach=how,
        tags=_tags(image, how, access, tags, vvfat_rw),
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
CHAIN_IMAGES = ("qcow2-chain1", "qcow2-chain2-subdir", "qcow2-chain3-nofmt")
DEEP_CHAINS = ("qcow2-chain2-subdir", "qcow2-chain3-nofmt")


def _opens_matrix() -> list[Scenario]:
    """The first matrix: every image attached every way, snapshots, hotplug, refusals."""
    m: list[Scenario] = []
    for image in IMAGES:
        m.append(scenario(image, AttachMode.DRIVE))
    m += [scenario(image, AttachMode.DRIVE) for image in VVFAT]
    m.append(scenario(VVFAT_RW, AttachMode.DRIVE, vvfat_rw=True))
    m.append(scenario(VVFAT_RW, AttachMode.DRIVE_DEVICE, vvfat_rw=True))
    for image in IMAGES:
        m.append(scenario(image, AttachMode.DRIVE_DEVICE))
    for image in ("raw", "qcow2-chain1", "vmdk-twoGbMaxExtentFlat", "vpc-dynamic", "vdi-static"):
        m.append(scenario(image, AttachMode.BLOCKDEV))
    for image in ("raw", "qcow2-chain2-subdir", "vmdk-monolithicFlat"):
        m.append(scenario(image, AttachMode.BLOCKDEV, read_only=True))
    m.append(scenario("qcow2-chain1", AttachMode.DRIVE, read_only=True))
    for image in ("raw", "qcow2-chain1"):
        m.append(scenario(image, AttachMode.BLOCKDEV, cache_direct=True))
    m.append(scenario("qcow2-v3", AttachMode.DRIVE_DEVICE, cache_direct=True))
    for op in ("snapshot-qmp", "snapshot-hmp", "snapshot-existing"):
        m.append(scenario("qcow2-chain1", AttachMode.DRIVE_DEVICE, ("read", op)))
    m.append(scenario("raw", AttachMode.DRIVE_DEVICE, ("snapshot-qmp",)))
    m.append(scenario("vmdk-twoGbMaxExtentFlat", AttachMode.DRIVE_DEVICE, ("snapshot-qmp",)))
    m.append(scenario("qcow2-v3", AttachMode.BLOCKDEV, ("snapshot-qmp",)))
    for image in ("raw", "qcow2-v3", "qcow2-chain1"):
        m.append(scenario(image, AttachMode.DRIVE_DEVICE, ("broker-restart",)))
    for image in ("raw", "qcow2-chain2-subdir", "vmdk-twoGbMaxExtentSparse", "vdi-dynamic"):
        m.append(scenario(image, AttachMode.HOTPLUG))
    m.append(scenario("qcow2-chain1", AttachMode.HOTPLUG, grant=Grant.MAIN))
    m.append(scenario("raw", AttachMode.HOTPLUG, grant=Grant.RO))
    m.append(scenario("qcow2-chain1", AttachMode.DRIVE_DEVICE, grant=Grant.RO))
    m.append(scenario("raw", AttachMode.DRIVE, grant=Grant.RO))
    return m


def _reopen_matrix() -> list[Scenario]:
    """Every command that reopens images: jobs, blockdev-reopen, media, temporary overlays."""
    m: list[Scenario] = []
    for image in DEEP_CHAINS:
        for attach in (AttachMode.DRIVE_DEVICE, AttachMode.DRIVE, AttachMode.BLOCKDEV):
            m.append(scenario(image, attach, ("commit",)))
        m.append(scenario(image, AttachMode.DRIVE_DEVICE, ("commit-backing-file",)))
    for image in CHAIN_IMAGES:
        for attach in (AttachMode.DRIVE_DEVICE, AttachMode.DRIVE, AttachMode.BLOCKDEV):
            m.append(scenario(image, attach, ("commit-active",)))
        m.append(scenario(image, AttachMode.DRIVE_DEVICE, ("stream",)))
        m.append(scenario(image, AttachMode.BLOCKDEV, ("stream",)))
    for image in DEEP_CHAINS:
        m.append(scenario(image, AttachMode.DRIVE_DEVICE, ("stream-base",)))
    for op in ("mirror-full", "mirror-top", "mirror-none", "mirror-cancel"):
        m.append(scenario("qcow2-chain1", AttachMode.DRIVE_DEVICE, (op,)))
    for image in ("raw", "qcow2-v3", "qcow2-chain2-subdir"):
        m.append(scenario(image, AttachMode.DRIVE_DEVICE, ("mirror-full",)))
    m.append(scenario("qcow2-chain1", AttachMode.BLOCKDEV, ("mirror-full",)))
    for image in ("raw", "qcow2-v3", "qcow2-chain1"):
        m.append(scenario(image, AttachMode.DRIVE_DEVICE, ("blockdev-mirror",)))
    for image in ("raw", "qcow2-v3", "qcow2-chain1", "qcow2-chain2-subdir"):
        m.append(scenario(image, AttachMode.DRIVE_DEVICE, ("backup",)))
    m.append(scenario("qcow2-chain1", AttachMode.DRIVE_DEVICE, ("backup-top",)))
    for image in ("raw", "qcow2-v3", "qcow2-chain1"):
        m.append(scenario(image, AttachMode.DRIVE_DEVICE, ("blockdev-backup",)))
    for image in ("raw", "qcow2-v3"):
        m.append(scenario(image, AttachMode.FILE_NODE, ("reopen-rw",)))
        m.append(scenario(image, AttachMode.FILE_NODE, ("reopen-direct",)))
    for image in ("raw", "qcow2-chain1", "vpc-dynamic"):
        m.append(scenario(image, AttachMode.CDROM, ("change-medium",)))
    m.append(scenario("qcow2-v3", AttachMode.CDROM, ("tray",)))
    for image in ("raw", "qcow2-v3", "qcow2-chain1", "vmdk-monolithicSparse"):
        m.append(scenario(image, AttachMode.SNAPSHOT_ON, ()))
    for image in ("raw", "qcow2-chain1", "vpc-dynamic"):
        m.append(scenario(image, AttachMode.SNAPSHOT, ()))
    for image in ("raw", "qcow2-v3", "qcow2-chain1", "vdi-dynamic"):
        m.append(scenario(image, AttachMode.NODE_REFS, ("read",)))
    for image in ("raw", "qcow2-v3", "qcow2-chain1"):
        m.append(scenario(image, AttachMode.JSON, ("read",)))
    return m


def build_matrix() -> list[Scenario]:
    m = _opens_matrix() + _reopen_matrix()
    check_unique(m)
    return m


def check_unique(scenarios: list[Scenario]) -> None:
    seen: dict[str, str] = {}
    for s in scenarios:
        if s.name in seen:
            raise ScenarioError(
                f"scenario name {s.name!r} is defined twice ({seen[s.name]} and {s.source})"
            )
        seen[s.name] = s.source


def select(matrix: list[Scenario], patterns: list[str]) -> list[Scenario]:
    """The scenarios whose name matches any of the glob ``patterns`` (all if none)."""
    if not patterns:
        return list(matrix)
    chosen = [s for s in matrix if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]
    if not chosen:
        raise ScenarioError(f"no scenario matches {' or '.join(patterns)} (see --list)")
    return chosen


__all__ = [
    "DRIVE",
    "GRANTS",
    "OVERLAY",
    "AttachMode",
    "Grant",
    "Op",
    "Scenario",
    "Tag",
    "all_operations",
    "attach_args",
    "build_matrix",
    "scenario",
    "select",
]
