"""QMP ``blockdev-reopen``: new options for nodes that exist.

For a ``file`` node (file-posix) the new flags are ``raw_parse_flags`` of
the new ``read-only`` and ``cache.direct``; ``raw_reopen_prepare`` opens
the file afresh when the access mode or ``O_DIRECT`` changes and dup()s
the descriptor otherwise (:meth:`testbed.block.nodes.FileNode.reopen`).
Options left out take their defaults, not the old values (QEMU 7.2's
``blockdev-reopen`` resets them): ``read-only`` false, ``cache.direct``
false, ``auto-read-only`` false.  A format node only changes its own
``read-only``; its ``file`` may be given as a nested object, reopened too.
Checked with strace of QEMU 7.2: read-only to read-write and back is
``O_RDWR`` then ``O_RDONLY``; ``cache.direct`` on and off is
``O_RDONLY|O_DIRECT`` then ``O_RDONLY``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from testbed.block.nodes import FileNode, open_flags
from testbed.block.options import flag
from testbed.errors import BlockError

if TYPE_CHECKING:
    from testbed.block.layer import BlockLayer


def blockdev_reopen(layer: BlockLayer, options: Sequence[Mapping[str, Any]]) -> None:
    if not options:
        raise BlockError("blockdev-reopen: 'options' must list at least one node")
    for opts in options:
        _reopen_one(layer, opts)


def _reopen_one(layer: BlockLayer, opts: Mapping[str, Any]) -> None:
    name = opts.get("node-name")
    if not isinstance(name, str):
        raise BlockError("blockdev-reopen: every entry needs a 'node-name'")
    node = layer.drive_or_node(name).top
    driver = opts.get("driver")
    read_only = flag(opts.get("read-only", False), what=f"{name}: read-only")
    cache = opts.get("cache") or {}
    direct = flag(cache.get("direct", False), what=f"{name}: cache.direct")
    if driver == "file":
        file = node.file.node
        if not isinstance(file, FileNode):
            raise BlockError(f"blockdev-reopen: node {name!r} is not a file node")
        if opts.get("filename", file.filename) != file.filename:
            raise BlockError(f"Cannot change the option 'filename' of node {name!r}")
        file.read_only, file.cache_direct = read_only, direct
        file.auto_read_only = flag(
            opts.get("auto-read-only", False), what=f"{name}: auto-read-only"
        )
        node.read_only = read_only
        new = open_flags(read_only=read_only, cache_direct=direct)
        if file.fd >= 0 and new != file.flags:
            file.reopen(new)
        return
    if driver is not None and driver != node.driver:
        raise BlockError(f"Cannot change the option 'driver' of node {name!r}")
    node.read_only = read_only
    child = opts.get("file")
    if isinstance(child, Mapping):
        _reopen_one(layer, child)
