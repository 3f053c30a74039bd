"""Removable media: a CD-ROM drive's tray, ``blockdev-change-medium``, ``eject``.

A ``-drive if=none,id=ID,media=cdrom`` (with or without ``file=``) under an
``ide-cd`` device is a BlockBackend whose medium comes and goes.  As
``strace`` of QEMU 7.2 shows (``tests/block/test_media.py``):

* ``blockdev-change-medium`` opens the new image read-only (a CD-ROM is
  read-only), probing the protocol as for any file name, with its backing
  chain; only then does the old medium go (read-only: no open);
* ``eject`` and ``blockdev-remove-medium`` close the medium, which opens
  nothing; ``blockdev-open-tray``/``blockdev-close-tray`` only move the
  tray; ``blockdev-insert-medium`` inserts a named node (nothing opened).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from testbed.block.nodes import FormatNode
from testbed.errors import BlockError

if TYPE_CHECKING:
    from testbed.block.layer import BlockLayer


@dataclass(eq=False)
class Tray:
    drive_id: str
    device_id: str | None = None
    medium: FormatNode | None = None
    open: bool = False
    #: The medium is a named node inserted with blockdev-insert-medium (not ours to close).
    borrowed: bool = False


class Media:
    """The CD-ROM trays of one :class:`BlockLayer`."""

    def __init__(self, layer: BlockLayer) -> None:
        self.layer = layer
        self.trays: dict[str, Tray] = {}
        self._count = 0
        layer.extra_users.append(lambda: [t.medium for t in self.trays.values() if t.medium])
        layer.quit_hooks.append(self._close_all)

    def add_drive(self, drive_id: str, path: str | None, fmt: str | None) -> Tray:
        """``-drive if=none,id=ID,media=cdrom[,file=PATH]``."""
        if drive_id in self.trays:
            raise BlockError(f"a drive named {drive_id!r} already exists")
        tray = Tray(drive_id=drive_id)
        if path:
            tray.medium = self._open(path, fmt)
        self.trays[drive_id] = tray
        return tray

    def attach(self, drive_id: str, device_id: str | None) -> None:
        self.tray(drive_id).device_id = device_id

    def tray(self, name: str) -> Tray:
        """A tray by device id (``id``) or drive name (``device``)."""
        for tray in self.trays.values():
            if name in (tray.device_id, tray.drive_id):
                return tray
        known = ", ".join(sorted(t.device_id or t.drive_id for t in self.trays.values())) or "none"
        raise BlockError(f"Device '{name}' not found or has no removable media (known: {known})")

    def _open(self, path: str, fmt: str | None) -> FormatNode:
        self._count += 1
        return self.layer.open_medium(path, fmt, node_name=f"medium{self._count}")

    def change_medium(self, name: str, filename: str, fmt: str | None = None) -> None:
        tray = self.tray(name)
        new = self._open(filename, fmt)  # opened before the old medium goes
        self._remove(tray)
        tray.medium, tray.borrowed, tray.open = new, False, False

    def eject(self, name: str, *, force: bool = False) -> None:
        tray = self.tray(name)
        tray.open = True
        self._remove(tray)

    def open_tray(self, name: str, *, force: bool = False) -> None:
        self.tray(name).open = True

    def close_tray(self, name: str) -> None:
        self.tray(name).open = False

    def remove_medium(self, name: str) -> None:
        tray = self.tray(name)
        if not tray.open:
            raise BlockError(f"Tray of device '{name}' is not open")
        self._remove(tray)

    def insert_medium(self, name: str, node_name: str) -> None:
        tray = self.tray(name)
        if not tray.open:
            raise BlockError(f"Tray of device '{name}' is not open")
        if tray.medium is not None:
            raise BlockError(f"There already is a medium in device '{name}'")
        tray.medium, tray.borrowed = self.layer.drive_or_node(node_name).top, True

    def _remove(self, tray: Tray) -> None:
        medium, tray.medium = tray.medium, None
        if medium is not None and not tray.borrowed:
            self.layer.close_node(medium)

    def _close_all(self) -> None:
        for tray in self.trays.values():
            self._remove(tray)
