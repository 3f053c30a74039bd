"""Where the benchmark finds its QEMU binaries: one function, keyed by build and version.

Every experiment asks :func:`find_qemu` (and :func:`find_open_hook_server`)
instead of naming paths, so a second QEMU version is one entry in
:data:`BINARIES` plus ``--qemu-version``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from pathlib import Path

from testbed.qemu import binaries


class Build(enum.StrEnum):
    STOCK = "stock"  # Debian's binary
    PATCHED = "patched"  # the series applied (make qemu)


DEFAULT_VERSION = "7.2"

#: (build, version) -> where that binary is; a function so nothing is looked up at import.
BINARIES: dict[tuple[Build, str], Callable[[], Path]] = {
    (Build.STOCK, "7.2"): lambda: binaries.STOCK_QEMU,
    (Build.PATCHED, "7.2"): binaries.patched_qemu_path,
}
#: version -> the series' C example server built with that patched QEMU.
OPEN_HOOK_SERVERS: dict[str, Callable[[], Path]] = {
    "7.2": binaries.open_hook_server_path,
}


def versions() -> list[str]:
    return sorted({v for _, v in BINARIES})


def find_qemu(build: Build, version: str = DEFAULT_VERSION) -> Path:
    """The ``qemu-system-x86_64`` of ``build`` at ``version`` (it may not be built yet)."""
    try:
        return BINARIES[(build, version)]()
    except KeyError:
        raise KeyError(
            f"no {build.value} QEMU {version} known to the benchmark "
            f"(known versions: {', '.join(versions())}; add it in testbed/bench/qemus.py)"
        ) from None


def find_open_hook_server(version: str = DEFAULT_VERSION) -> Path:
    try:
        return OPEN_HOOK_SERVERS[version]()
    except KeyError:
        raise KeyError(f"no open-hook-server for QEMU {version} known to the benchmark") from None


def missing(path: Path, what: str) -> str | None:
    """Why ``path`` cannot be run, or None."""
    if binaries.is_runnable(path):
        return None
    hint = " (make qemu)" if "build" in path.parts else ""
    return f"{what} {path} is not built{hint}"
