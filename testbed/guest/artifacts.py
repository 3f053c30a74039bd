"""Where the guest kernel and its initramfs are (``make guest``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import BuildError
from testbed.qemu import DEFAULT_VERSION, Kind, qemu_binary
from testbed.qemu.binaries import is_runnable

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


def guest_qemu(*, hook: bool, qemu: Path | None = None, version: str | None = None) -> Path:
    """The QEMU binary a guest boot runs: the one place the guest chooses it.

    ``qemu`` wins when given; otherwise ``version``'s (default 7.2) patched
    build for the hook and its stock binary without it (Debian's for 7.2,
    the unpatched build of the same source for 10.0).  Raises
    :class:`BuildError` naming the binary when it cannot be run, and
    :class:`~testbed.errors.QemuVersionError` for an unknown version.
    """
    name = version or DEFAULT_VERSION
    binary = qemu or qemu_binary(name, Kind.PATCHED if hook else Kind.STOCK)
    if not is_runnable(binary):
        hint = f" (QEMU {name}: run `make qemu`)" if qemu is None else ""
        raise BuildError(f"QEMU binary {binary} is missing{hint}")
    return binary
