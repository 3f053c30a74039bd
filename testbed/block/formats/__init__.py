"""Image format drivers of the block-layer model, one module per format.

The registry is built on first use, not at import time, so importing one
driver (or this package) never imports the others.

Also here: :func:`read_checked`, the one way drivers read metadata, so that
a header field can never send a read past the end of the file unnoticed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from testbed.errors import CorruptImageError, UnknownFormatError

if TYPE_CHECKING:
    from testbed.block.driver import BlockFile, FormatDriver

#: QEMU driver name -> (module under this package, class name).
_MODULES: dict[str, tuple[str, str]] = {
    "raw": ("raw", "RawDriver"),
    "qcow2": ("qcow2", "Qcow2Driver"),
    "vpc": ("vpc", "VpcDriver"),
    "vdi": ("vdi", "VdiDriver"),
    "vmdk": ("vmdk", "VmdkDriver"),
}

#: QEMU's ``bdrv_raw``: the format of bytes that name none -- an empty file
#: (``find_image_format``), a bare protocol node, a file no driver claims.
BYTES_FORMAT = "raw"

_loaded: dict[str, type[FormatDriver]] = {}


def _load(name: str) -> type[FormatDriver]:
    if name not in _loaded:
        module_name, class_name = _MODULES[name]
        module = importlib.import_module(f"{__name__}.{module_name}")
        _loaded[name] = getattr(module, class_name)
    return _loaded[name]


def get_driver(name: str) -> type[FormatDriver]:
    """The driver class for QEMU's format name ``name`` (``"qcow2"``, ...).

    Raises :class:`~testbed.errors.UnknownFormatError` (a ``KeyError``) naming
    the format when there is no such driver.
    """
    if name not in _MODULES:
        raise UnknownFormatError(name, sorted(_MODULES))
    return _load(name)


def all_drivers() -> dict[str, type[FormatDriver]]:
    """Every driver by name, in a fixed order (for probing)."""
    return {name: _load(name) for name in _MODULES}


def read_checked(
    file: BlockFile, offset: int, length: int, *, fmt: str, field: str, file_size: int | None = None
) -> bytes:
    """``length`` bytes at ``offset``, or CorruptImageError if they are not all in the file.

    ``field`` names the header field that pointed here, so the error says
    which value was wrong.  Pass ``file_size`` when it is already known.
    """
    size = file.size() if file_size is None else file_size
    if offset < 0 or length < 0 or offset + length > size:
        raise CorruptImageError(
            fmt=fmt,
            field=field,
            offset=offset,
            message=f"{length} bytes at {offset:#x} lie past the end of the file ({size} bytes)",
        )
    return file.pread(offset, length)
