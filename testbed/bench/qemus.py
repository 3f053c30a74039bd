"""Where the benchmark finds its QEMU binaries: one function, keyed by build and version.

Every experiment asks :func:`find_qemu` (and :func:`find_open_hook_server`)
instead of naming paths; both go to ``testbed.qemu.qemu_binary``, so every
version in the QEMU registry can be benchmarked with ``--qemu-version``.
"""

from __future__ import annotations

import enum
from pathlib import Path

from testbed.errors import UnknownPartError
from testbed.qemu import Kind, binaries, built_versions, qemu_binary
from testbed.qemu.versions import VERSIONS


class Build(enum.StrEnum):
    STOCK = "stock"  # Debian's binary
    PATCHED = "patched"  # the series applied (make qemu)


DEFAULT_VERSION = "7.2"


def versions() -> list[str]:
    """Every QEMU version the testbed knows (testbed.qemu.versions.VERSIONS)."""
    return list(VERSIONS)


def default_versions() -> tuple[str, ...]:
    """Every built version, :data:`DEFAULT_VERSION` first (just it when none is built,
    so that the rows say what is missing)."""
    built = built_versions()
    rest = tuple(v for v in built if v != DEFAULT_VERSION)
    return (DEFAULT_VERSION, *rest) if DEFAULT_VERSION in built or not rest else rest


def versioned(key: str, version: str, primary: str) -> str:
    """A ratio's key on ``version``: ``key`` itself on the run's primary version,
    ``key@version`` on any other."""
    return key if version == primary else f"{key}@{version}"


def find_qemu(build: Build, version: str = DEFAULT_VERSION) -> Path:
    """The ``qemu-system-x86_64`` of ``build`` at ``version`` (it may not be built yet)."""
    if version not in VERSIONS:
        raise UnknownPartError(
            f"no QEMU {version} known to the benchmark (known: {', '.join(VERSIONS)})"
        )
    return qemu_binary(version, build.value)


def find_open_hook_server(version: str = DEFAULT_VERSION) -> Path:
    if version not in VERSIONS:
        raise UnknownPartError(f"no open-hook-server for QEMU {version} known to the benchmark")
    return qemu_binary(version, Kind.OPEN_HOOK_SERVER)


def missing(path: Path, what: str) -> str | None:
    """Why ``path`` cannot be run, or None."""
    if binaries.is_runnable(path):
        return None
    hint = " (make qemu)" if "build" in path.parts else ""
    return f"{what} {path} is not built{hint}"
