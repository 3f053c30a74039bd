"""Where the QEMU binaries are: Debian's, and the patched build ``make qemu`` links."""

from __future__ import annotations

import subprocess
from pathlib import Path

from testbed.errors import BuildError

#: Debian's QEMU, the stock binary every comparison runs against.
STOCK_QEMU = Path("/usr/bin/qemu-system-x86_64")

#: The checkout this package lives in (``build/`` and ``scripts/`` are there).
REPO_ROOT = Path(__file__).resolve().parents[2]


def build_dir(repo: Path | None = None) -> Path:
    """``build/qemu`` of the checkout: a symlink into the build cache."""
    return (repo or REPO_ROOT) / "build" / "qemu"


def patched_qemu_path(repo: Path | None = None) -> Path:
    """The patched ``qemu-system-x86_64`` (it may not exist: see :func:`is_runnable`)."""
    return build_dir(repo) / "bin" / "qemu-system-x86_64"


def open_hook_server_path(repo: Path | None = None) -> Path:
    """The series' C example broker, built with the patched QEMU."""
    return build_dir(repo) / "bin" / "open-hook-server"


def is_runnable(path: Path) -> bool:
    return path.is_file() and path.stat().st_mode & 0o111 != 0


def cache_key(repo: Path | None = None) -> str:
    """The key ``scripts/build-qemu.sh`` would build or find the current inputs under."""
    script = (repo or REPO_ROOT) / "scripts" / "build-qemu.sh"
    try:
        done = subprocess.run(
            [str(script), "--print-key"], capture_output=True, text=True, timeout=60, check=True
        )
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"cannot compute the QEMU cache key with {script}: {err}") from err
    return done.stdout.strip()
