"""Which QEMU builds exist, and the programs QEMU's iotests need for each.

A *build* is a directory with ``info.json`` and ``bin/qemu-system-x86_64``,
as ``scripts/build-qemu.sh`` leaves it in the cache and links it into the
checkout: ``build/qemu`` (one version) or ``build/qemu/<version>/patched``
(several versions, with a ``stock`` sibling where the stock oracle is built).
Its source tree (the one the suite's ``check`` script comes from) is
``$TESTBED_CACHE/qemu-src/<source version>``.

The suite also runs qemu-img, qemu-io, qemu-nbd and qemu-storage-daemon, and
they must come from the same source version as the system emulator:
:func:`suite_tools` is the one place that decides where they come from.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import IotestsError
from testbed.qemu.binaries import REPO_ROOT, STOCK_QEMU, is_runnable

#: The programs ``check`` wants besides the system emulator, by the names a
#: build's ``bin/`` and Debian's ``/usr/bin`` give them.
TOOL_NAMES = ("qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon")

#: Debian's qemu-utils and qemu-system-common: the same source as the 7.2 build.
SYSTEM_BIN = Path("/usr/bin")


def cache_root() -> Path:
    return Path(os.environ.get("TESTBED_CACHE", Path.home() / ".cache" / "testbed"))


def upstream_version(source_version: str) -> str:
    """``1:7.2+dfsg-7+deb12u18`` -> ``7.2``; ``1:10.0.13+ds-0+deb13u1`` -> ``10.0``."""
    m = re.match(r"(?:\d+:)?(\d+)\.(\d+)", source_version)
    if m is None:
        raise IotestsError(f"cannot read an upstream version from {source_version!r}")
    return f"{m.group(1)}.{m.group(2)}"


@dataclass(frozen=True)
class SuiteTools:
    """The non-system programs ``check`` runs (QEMU_IMG_PROG and friends)."""

    qemu_img: Path
    qemu_io: Path
    qemu_nbd: Path
    qemu_storage_daemon: Path
    origin: str  # where they came from, for the report

    def env(self) -> dict[str, str]:
        return {
            "QEMU_IMG_PROG": str(self.qemu_img),
            "QEMU_IO_PROG": str(self.qemu_io),
            "QEMU_NBD_PROG": str(self.qemu_nbd),
            "QSD_PROG": str(self.qemu_storage_daemon),
        }


@dataclass(frozen=True)
class QemuBuild:
    """One patched QEMU build and the source tree it was built from."""

    version: str  # upstream major.minor, e.g. "7.2"
    source_version: str  # Debian's, e.g. "1:7.2+dfsg-7+deb12u18"
    build_dir: Path

    @property
    def system_emulator(self) -> Path:
        return self.build_dir / "bin" / "qemu-system-x86_64"

    @property
    def source_tree(self) -> Path:
        return cache_root() / "qemu-src" / self.source_version.replace(":", "_")

    @property
    def iotests_source(self) -> Path:
        return self.source_tree / "tests" / "qemu-iotests"


def read_build(path: Path) -> QemuBuild | None:
    """The build in ``path``, or None when it holds no complete build."""
    info_file = path / "info.json"
    if not (info_file.is_file() and is_runnable(path / "bin" / "qemu-system-x86_64")):
        return None
    try:
        info = json.loads(info_file.read_text())
        source_version = str(info["source_version"])
        kind = str(info.get("kind", "patched"))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise IotestsError(f"{info_file}: unreadable build description ({err})") from err
    if kind != "patched":
        return None
    version = str(info.get("version") or upstream_version(source_version))
    return QemuBuild(version, source_version, path)


def _version_key(b: QemuBuild) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", b.version))


def find_builds(repo: Path | None = None, dirs: Sequence[Path] = ()) -> list[QemuBuild]:
    """The patched builds in ``dirs``, or else every one linked in the checkout.

    One per version, oldest first.  A directory in ``dirs`` that holds no
    patched build is an error naming it.
    """
    found: dict[str, QemuBuild] = {}
    if dirs:
        for d in dirs:
            b = read_build(d)
            if b is None:
                raise IotestsError(
                    f"{d}: no patched QEMU build (info.json, bin/qemu-system-x86_64)"
                )
            found.setdefault(b.version, b)
    else:
        root = (repo or REPO_ROOT) / "build" / "qemu"
        for path in [root, *sorted(root.glob("*/patched"))]:
            b = read_build(path)
            if b is not None:
                found.setdefault(b.version, b)
    return sorted(found.values(), key=_version_key)


def tool_version(path: Path) -> str:
    """The first line of ``PROG --version`` (empty when it cannot be run)."""
    try:
        out = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.splitlines()[0] if out else ""


def _tools(paths: list[Path], origin: str) -> SuiteTools:
    img, io, nbd, qsd = paths
    return SuiteTools(img, io, nbd, qsd, origin)


def suite_tools(build: QemuBuild) -> SuiteTools:
    """qemu-img, qemu-io, qemu-nbd and qemu-storage-daemon for ``build``.

    The build's own ``bin/`` wins once it carries all four (the 10.0 port
    adds them to every build's outputs).  Until then Debian's packaged
    tools stand in, but only when ``--version`` shows they were built from
    the same Debian source version as the build; anything else is an error
    naming what is missing, never a silent mix of versions.
    """
    own = [build.build_dir / "bin" / n for n in TOOL_NAMES]
    if all(is_runnable(p) for p in own):
        return _tools(own, f"{build.build_dir}/bin")
    system = [SYSTEM_BIN / n for n in TOOL_NAMES]
    missing = [str(p) for p in system if not is_runnable(p)]
    if missing:
        raise IotestsError(
            f"QEMU {build.version}: {build.build_dir}/bin has no qemu-img/qemu-io/qemu-nbd/"
            f"qemu-storage-daemon and Debian's are missing too: {', '.join(missing)} "
            "(apt-get install qemu-utils qemu-system-common)"
        )
    debian = build.source_version.split(":", 1)[-1]
    for p in system:
        line = tool_version(p)
        if debian not in line:
            raise IotestsError(
                f"QEMU {build.version}: {p} is {line or 'not runnable'!r}, not built from "
                f"source {build.source_version}; the suite needs tools of the emulator's version"
            )
    return _tools(system, f"Debian {debian} ({SYSTEM_BIN})")


def block_formats(build: QemuBuild) -> frozenset[str]:
    """The block drivers the build's qemu-system has (``-drive format=help``)."""
    try:
        out = subprocess.run(
            [str(build.system_emulator), "-machine", "none", "-drive", "format=help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise IotestsError(f"QEMU {build.version}: cannot ask for its formats: {err}") from err
    for line in out.splitlines():
        if line.startswith("Supported formats:"):
            return frozenset(line.split(":", 1)[1].split())
    raise IotestsError(
        f"QEMU {build.version}: {build.system_emulator} -drive format=help listed no formats"
    )


def stock_emulator(build: QemuBuild) -> Path | None:
    """The qemu-system mode ``supervised`` runs: unpatched, of the same source version.

    The stock build beside a patched one (10.0); else Debian's binary of that
    version if it has the ``qtest`` accelerator the suite's Python tests
    start every QEMU with; else the build's own emulator, which without
    ``-open-hook-fd`` opens exactly as stock QEMU does (the series acts only
    when the option is given; the unhooked mode runs that same binary).
    Debian's 7.2 is built without qtest (``-accel help``: tcg, kvm), so 7.2
    takes the last.  None for a build with no system emulator.
    """
    sibling = build.build_dir.parent / "stock" / "bin" / "qemu-system-x86_64"
    if build.build_dir.name == "patched" and is_runnable(sibling):
        return sibling
    if (
        is_runnable(STOCK_QEMU)
        and build.source_version.split(":", 1)[-1] in tool_version(STOCK_QEMU)
        and has_qtest(STOCK_QEMU)
    ):
        return STOCK_QEMU
    return build.system_emulator if is_runnable(build.system_emulator) else None


def has_qtest(binary: Path) -> bool:
    """Whether ``binary`` lists the ``qtest`` accelerator (``-accel help``)."""
    try:
        out = subprocess.run(
            [str(binary), "-accel", "help"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "qtest" in out.split()


__all__ = [
    "TOOL_NAMES",
    "QemuBuild",
    "SuiteTools",
    "block_formats",
    "find_builds",
    "stock_emulator",
    "suite_tools",
    "upstream_version",
]
