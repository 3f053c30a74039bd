"""Where the benchmark finds its QEMU binaries: one function, keyed by build and version.

Every experiment asks :func:`find_qemu` (and :func:`find_open_hook_server`)
instead of naming paths; both go to ``testbed.qemu.qemu_binary``, so every
version in the QEMU registry can be benchmarked with ``--qemu-version``.
"""

from __future__ import annotations

import enum
from pathlib import Path

from testbed.qemu import Kind, binaries, qemu_binary
from testbed.qemu.versions import VERSIONS


class Build(enum.StrEnum):
    STOCK = "stock"  # Debian's binary
    PATCHED = "patched"  # the series applied (make qemu)


DEFAULT_VERSION = "7.2"


def versions() -> list[str]:
    """Every QEMU version the testbed knows (testbed.qemu.versions.VERSIONS)."""
    return list(VERSIONS)


def find_qemu(build: Build, version: str = DEFAULT_VERSION) -> Path:
    """The ``qemu-system-x86_64`` of ``build`` at ``version`` (it may not be built yet)."""
    if version not in VERSIONS:
        raise KeyError(f"no QEMU {version} known to the benchmark (known: {', '.join(VERSIONS)})")
    return qemu_binary(version, build.value)


def find_open_hook_server(version: str = DEFAULT_VERSION) -> Path:
    if version not in VERSIONS:
        raise KeyError(f"no open-hook-server for QEMU {version} known to the benchmark")
    return qemu_binary(version, Kind.OPEN_HOOK_SERVER)


def missing(path: Path, what: str) -> str | None:
    """Why ``path`` cannot be run, or None."""
    if binaries.is_runnable(path):
        return None
    hint = " (make qemu)" if "build" in path.parts else ""
    return f"{what} {path} is not built{hint}"
