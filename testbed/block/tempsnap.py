"""``-snapshot`` and ``-drive ...,snapshot=on``: the temporary qcow2 overlay.

``bdrv_append_temp_snapshot`` in QEMU 7.2's ``block.c``, as strace shows it
for a qcow2 top (``snapshot=on`` and ``-snapshot`` alike):

1. the image and its chain open read-only (the overlay takes the writes);
2. ``create_tmp_file``: ``g_mkstemp("$TMPDIR/vl.XXXXXX")``, i.e.
   ``O_RDWR|O_CREAT|O_EXCL`` mode 0600 (patch 0006 sends it to the broker
   with ``qemu_mkstemp``; unpatched it bypasses ``qemu_open``), closed;
3. ``bdrv_create`` of qcow2 on it: one host_cdrom probe, ``O_RDWR|O_CREAT``
   0644 (``raw_co_create``), a probe and ``O_RDWR`` to write the header
   (backing file: the image's name and format), closed;
4. the overlay opened ``O_RDWR`` with ``file.driver=file`` named (no probe,
   no auto-read-only), its backing the image; the file is unlinked.
"""

from __future__ import annotations

import contextlib
import os
import random
import string
from typing import TYPE_CHECKING

from testbed.block.driver import FdFile
from testbed.block.nodes import FormatNode
from testbed.errors import BlockError

if TYPE_CHECKING:
    from testbed.block.layer import BlockLayer

#: ``create_tmp_file``'s directory when ``TMPDIR`` is not set.
DEFAULT_TMPDIR = "/var/tmp"
_LETTERS = string.ascii_letters + string.digits


def mkstemp_name(tmpdir: str, rng: random.Random | None = None) -> str:
    """``$TMPDIR/vl.XXXXXX`` with the six letters filled in, as ``g_mkstemp`` does."""
    pick = rng or random.SystemRandom()
    return f"{tmpdir}/vl." + "".join(pick.choice(_LETTERS) for _ in range(6))


def append_temp_snapshot(layer: BlockLayer, top: FormatNode, *, tmpdir: str | None) -> FormatNode:
    """Put a temporary qcow2 overlay over ``top``; the overlay is the new top."""
    from testbed.block.formats.qcow2 import create_image
    from testbed.block.layer import OpenOptions

    directory = tmpdir or os.environ.get("TMPDIR") or DEFAULT_TMPDIR
    opener = layer.opener
    for _ in range(100):
        name = mkstemp_name(directory)
        try:
            fd = opener.qemu_open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        except OSError as err:
            raise BlockError(f"Could not open temporary file '{name}': {err.strerror}") from err
        os.close(fd)
        break
    else:
        raise BlockError(f"Could not open temporary file in {directory}: every name was taken")
    try:
        opener.probe(name)  # bdrv_create_file -> bdrv_find_protocol
        fd = opener.qemu_create(name, os.O_RDWR, 0o644)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        opener.probe(name)  # qcow2_co_create_opts: blk_new_open of the protocol
        fd = opener.qemu_open(name, os.O_RDWR)
        try:
            create_image(
                FdFile(fd, name),
                size=top.virtual_size,
                backing_file=top.filename,
                backing_format=top.driver,
            )
        finally:
            os.close(fd)
        opts = OpenOptions(read_only=False, auto_read_only=False, cache_direct=top.cache_direct)
        overlay = layer.open_image(
            name,
            fmt="qcow2",
            probe=False,
            opts=opts,
            node_name=f"{top.node_name}-snapshot",
            no_backing=True,
        )
    finally:
        # BDRV_O_TEMPORARY: nobody may open the file again; QEMU unlinks it at once
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
    overlay.backing = top
    return overlay
