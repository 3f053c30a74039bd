"""Where the guest kernel and its initramfs are (``make guest``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import BuildError
from testbed.qemu import patched_qemu_path
from testbed.qemu.binaries import STOCK_QEMU, is_runnable

REPO = Path(__file__).resolve().parents[2]
#: ``make guest`` links this to the cached build.
GUEST_DIR = REPO / "build" / "guest"


@dataclass(frozen=True, kw_only=True)
class GuestFiles:
    kernel: Path
    initrd: Path
    info: dict[str, object]


def find_guest(directory: Path | None = None) -> GuestFiles:
    """The guest in ``directory`` (default ``build/guest``); BuildError names what is missing."""
    d = directory or GUEST_DIR
    kernel, initrd, info = d / "vmlinuz", d / "initrd.img", d / "info.json"
    for path in (kernel, initrd, info):
        if not path.is_file():
            raise BuildError(f"guest file {path} is missing (run `make guest`)")
    try:
        meta = json.loads(info.read_text())
    except (OSError, ValueError) as err:
        raise BuildError(f"cannot read {info}: {err} (run `make guest`)") from err
    return GuestFiles(kernel=kernel, initrd=initrd, info=meta)


def guest_available(directory: Path | None = None) -> bool:
    try:
        find_guest(directory)
    except BuildError:
        return False
    return True


def guest_qemu(*, hook: bool, qemu: Path | None = None) -> Path:
    """The QEMU binary a guest boot runs: the one place the guest chooses it.

    ``qemu`` wins when given; otherwise the patched build for the hook and
    Debian's binary without it.  (A ``--qemu-version`` belongs here.)
    Raises :class:`BuildError` naming the binary when it cannot be run.
    """
    binary = qemu or (patched_qemu_path() if hook else STOCK_QEMU)
    if not is_runnable(binary):
        hint = " (run `make qemu`)" if hook and qemu is None else ""
        raise BuildError(f"QEMU binary {binary} is missing{hint}")
    return binary
