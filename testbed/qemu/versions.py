"""The QEMU versions the testbed builds and runs: one :class:`QemuVersion` entry each.

Adding a version is one entry in :data:`VERSIONS` plus its series under
``patches/<series>/``.  ``scripts/build-qemu.sh`` reads this module too (it
runs this file as a script, standard library only), so the build and the
Python side cannot disagree about a source, a series or a path::

    python3 testbed/qemu/versions.py names          # 7.2 10.0
    python3 testbed/qemu/versions.py shell 10.0     # QV_SUITE=trixie ...

Every build lands in the cache and is linked at
``build/qemu/<version>/<kind>/`` (``bin/`` inside); see :mod:`testbed.qemu`.
"""

from __future__ import annotations

import enum
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import QemuVersionError


class Kind(enum.StrEnum):
    """What a binary is: built with the series, Debian's/unpatched, or the C example broker."""

    PATCHED = "patched"
    STOCK = "stock"
    OPEN_HOOK_SERVER = "open-hook-server"


#: The programs every build installs in its ``bin/`` (the iotests need the tools).
SYSTEM_EMULATOR = "qemu-system-x86_64"
TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon")
OPEN_HOOK_SERVER = "open-hook-server"


@dataclass(frozen=True, kw_only=True)
class QemuVersion:
    """One QEMU line: where its Debian source comes from and how it is built."""

    #: The name used everywhere (``--qemu-version``, test ids, ``build/qemu/<name>``).
    name: str
    #: The Debian suite whose ``deb-src`` has the source.  Its entries are derived
    #: from the system's own ``deb`` entries (same mirrors, suite renamed).
    suite: str
    #: The Debian source version to build; "" means "the installed
    #: qemu-system-x86's", so that Debian's binary and the patched one differ
    #: only by the series.
    source_version: str
    #: The directory under ``patches/`` holding its ``series``.
    series: str
    #: Debian's binary, when it is this version's stock oracle; None means the
    #: stock oracle is the same source built a second time without the series.
    system_stock: Path | None = None
    #: A pip requirement for meson, installed into the build's own
    #: environment ("" = the system's meson is new enough).
    meson: str = ""
    #: configure options this version needs on top of the common ones.
    configure_extra: tuple[str, ...] = ()

    @property
    def builds_stock(self) -> bool:
        """Whether ``make qemu`` builds an unpatched binary for this version."""
        return self.system_stock is None

    @property
    def built_kinds(self) -> tuple[Kind, ...]:
        """The cache entries ``make qemu`` makes for this version."""
        return (Kind.PATCHED, Kind.STOCK) if self.builds_stock else (Kind.PATCHED,)


VERSIONS: dict[str, QemuVersion] = {
    v.name: v
    for v in (
        QemuVersion(
            name="7.2",
            suite="bookworm",
            source_version="",
            series="7.2",
            system_stock=Path("/usr/bin") / SYSTEM_EMULATOR,
        ),
        QemuVersion(
            name="10.0",
            suite="trixie",
            source_version="1:10.0.13+ds-0+deb13u1",
            series="10.0",
            # bookworm has meson 1.0.1, QEMU 10.0 needs >= 1.5, and the +ds
            # source drops the wheel upstream bundles in python/wheels
            meson="meson==1.5.2",
            # configure would otherwise try to download meson and subprojects;
            # vmdk, vpc and vhdx became features after 7.2 (always built there),
            # so --without-default-features leaves them out unless asked for
            configure_extra=(
                "--disable-download",
                "--enable-vmdk",
                "--enable-vpc",
                "--enable-vhdx",
            ),
        ),
    )
}

#: The version the old single-version helpers (``patched_qemu_path()``) mean.
DEFAULT_VERSION = "7.2"


def get(name: str) -> QemuVersion:
    """The registry entry for ``name`` ("7.2", "10.0"); QemuVersionError names the known ones."""
    try:
        return VERSIONS[name]
    except KeyError:
        known = ", ".join(VERSIONS)
        raise QemuVersionError(f"unknown QEMU version {name!r} (known: {known})") from None


def kind_of(name: str | Kind) -> Kind:
    """``name`` as a :class:`Kind`; QemuVersionError names the known kinds."""
    try:
        return Kind(name)
    except ValueError:
        known = ", ".join(k.value for k in Kind)
        raise QemuVersionError(f"unknown QEMU binary kind {name!r} (known: {known})") from None


def parse_versions(text: str | None) -> tuple[QemuVersion, ...]:
    """A ``--qemu-version``/``QEMU_VERSIONS`` value (commas or spaces); empty = every version."""
    names = (text or "").replace(",", " ").split()
    if not names:
        return tuple(VERSIONS.values())
    out: list[QemuVersion] = []
    for n in names:
        v = get(n)
        if v not in out:
            out.append(v)
    return tuple(out)


def shell_assignments(v: QemuVersion) -> str:
    """The entry as shell variable assignments, for ``scripts/build-qemu.sh``."""
    values = {
        "QV_NAME": v.name,
        "QV_SUITE": v.suite,
        "QV_SOURCE_VERSION": v.source_version,
        "QV_SERIES": v.series,
        "QV_BUILD_STOCK": "1" if v.builds_stock else "0",
        "QV_MESON": v.meson,
    }
    lines = [f"{k}={shlex.quote(val)}" for k, val in values.items()]
    lines.append("QV_CONFIGURE_EXTRA=(" + " ".join(shlex.quote(a) for a in v.configure_extra) + ")")
    lines.append("QV_TOOLS=(" + " ".join(TOOLS) + ")")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    usage = "usage: versions.py names [QEMU_VERSIONS] | shell VERSION"
    try:
        if argv[:1] == ["names"] and len(argv) <= 2:
            print(" ".join(v.name for v in parse_versions(argv[1] if len(argv) == 2 else None)))
            return 0
        if argv[:1] == ["shell"] and len(argv) == 2:
            print(shell_assignments(get(argv[1])))
            return 0
    except QemuVersionError as err:
        print(f"versions.py: {err}", file=sys.stderr)
        return 1
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
