"""The block layer of QEMU 7.2, as far as it decides which files are opened, how and when.

:class:`BlockLayer` mirrors what QEMU does for a command line or QMP
command, so that one scenario can be replayed on the model and on QEMU and
the two broker traces compared open by open.  Every open goes through one
:class:`testbed.block.opener.Opener` (the broker, or ``os.open`` in tests).

Modelled (each checked against ``strace`` of Debian's QEMU 7.2, see
``tests/block``):

* ``-drive file=F[,format=FMT][,read-only=on][,cache.direct=on]``
  (:meth:`BlockLayer.drive_add`): the host_cdrom probe
  (``O_RDONLY|O_NONBLOCK``, closed at once) before every open of a file
  whose protocol driver is not named (``bdrv_find_protocol``);
  ``auto-read-only``: ``O_RDONLY`` first, ``O_RDWR`` as soon as a writer
  appears -- at once for a qcow2/vmdk node (its ``file`` is a metadata
  child), only with a device for raw (a data child,
  :meth:`BlockLayer.attach_device`); format probing like
  ``find_image_format``/``bdrv_probe_all`` over the first 2048 bytes, raw
  scoring 1.
* ``-blockdev``/``blockdev-add`` (:meth:`BlockLayer.blockdev_add`): no probe
  of the named protocol, ``O_RDWR`` at once unless ``read-only``,
  ``cache.direct`` → ``O_DIRECT``; ``blockdev-del`` closes without reopening.
* Backing chains of any depth: names resolved with ``path_combine`` (no
  normalisation), opened read-only with a probe, backing format from the
  image or probed, ``cache.direct`` inherited.  A backing loop fails like
  QEMU's image locking does when the repeated file is open for writing
  ("Failed to get shared "write" lock", after the repeated file's probe and
  open); with a read-only top QEMU recurses until it runs out of
  descriptors, the model stops at the same point with "backing loop".
  After a failed open everything opened so far is torn down, auto-read-only
  files reopened ``O_RDONLY`` first, as QEMU does.
* Children through :class:`OpenContext` (vmdk extents, qcow2 data file):
  probe + open with the parent's flags (extent names relative to the
  descriptor, the qcow2 data file name as stored, i.e. relative to the
  working directory, as strace of QEMU 7.2 shows); sparse extents are metadata
  children (``O_RDWR`` at once when writable), flat extents and data files
  data children (``O_RDWR`` only with a device).
* Reopen as file-posix: a fresh ``qemu_open`` when the access mode or
  ``O_DIRECT`` changes, dup + fcntl otherwise.  ``O_DIRECT`` refused with
  ``EINVAL`` is retried without it only to word the error.
* ``blockdev-snapshot-sync`` (both ``absolute-paths`` and ``existing``)
  and HMP ``snapshot_blkdev`` (the same calls): two ENOENT probes,
  ``O_RDWR|O_CREAT`` 0644 + close, probe + ``O_RDWR`` for the qcow2 header
  (``qcow2.create_image``) + close, the overlay opened like the old top
  (probe, ``O_RDONLY`` then ``O_RDWR`` for -drive; ``O_RDWR`` for
  -blockdev; ``O_RDONLY`` only when read-only) without its backing, then
  appended over the old top, which is reopened read-only (extents first,
  then its file).
* ``quit``: the device lets go, every node is closed; auto-read-only files
  still open ``O_RDWR`` are reopened ``O_RDONLY`` just before their close.
* ``fat:`` file names go to :class:`testbed.block.vvfat.VVFat` (after the
  host_cdrom probe of the whole name, which QEMU makes too).

Elsewhere: block jobs (:mod:`testbed.block.jobs`), ``blockdev-reopen``
(:mod:`testbed.block.reopen`), removable media (:mod:`testbed.block.media`),
``-snapshot``/``snapshot=on`` (:mod:`testbed.block.tempsnap`), ``json:``
names (:mod:`testbed.block.options`); node references in ``blockdev-add``
(``"file": NODE``, ``"backing": NODE | null``) are handled here.

Knowingly left out: real OFD locks (only the same-process conflicts that
end a backing loop or refuse a node over a file another node writes are
modelled, and they follow permissions, not descriptors), host_cdrom/
host_device nodes (a file is never a CD-ROM), encryption, and qcow2
internal snapshots.  ``docs/block-model.md`` lists what the jobs leave out.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from testbed.block import formats
from testbed.block.driver import (
    BlockFile,
    ChildRole,
    ChildSpec,
    FdFile,
    FormatDriver,
    FormatImage,
)
from testbed.block.nodes import Child, FileNode, FormatNode, ProtocolNode, VVFatNode
from testbed.block.opener import HookLike, Opener, OpenEvent
from testbed.block.paths import path_combine
from testbed.errors import BlockError, BlockUsageError
from testbed.qemu.commandline import Attach, AttachKind

#: How much of an image ``find_image_format`` reads for probing.
PROBE_BYTES = 2048


@dataclass(frozen=True, kw_only=True)
class OpenOptions:
    """How a node and its children are opened (QEMU's open flags and options)."""

    read_only: bool
    auto_read_only: bool
    cache_direct: bool


@dataclass(eq=False)
class Drive:
    """A ``-drive`` (or a named ``-blockdev`` node) and its device."""

    id: str
    top: FormatNode
    device: bool = False


class _ChildOpener:
    """The :class:`OpenContext` a format driver gets while its node opens."""

    def __init__(self, layer: BlockLayer, opts: OpenOptions, driver: type[FormatDriver]) -> None:
        self._layer = layer
        self._opts = opts
        self._driver = driver
        self.children: list[Child] = []

    @property
    def read_only(self) -> bool:
        return self._opts.read_only

    def open_file(self, filename: str, *, child: ChildSpec, relative_to: BlockFile) -> BlockFile:
        if child not in self._driver.children:
            raise BlockUsageError(
                f"the {self._driver.name} driver opened a {child.name!r} child it does not declare"
            )
        if child.relative_to_parent:
            filename = path_combine(relative_to.filename, filename)
        node = self._layer._open_protocol(filename, probe=True, opts=self._opts)
        self.children.append(Child(node=node, role=child.role, name=child.name))
        # bdrv_open_child attaches at once: a metadata child of a writable
        # node goes read-write before the next file is opened.
        node.set_write(child.role is ChildRole.METADATA and not self._opts.read_only)
        return node


class BlockLayer:
    """QEMU's block layer for the open path: drives, nodes, snapshots, quit."""

    def __init__(
        self,
        hook: HookLike | None = None,
        *,
        opener: Opener | None = None,
        qemu_version: str = "7.2",
    ) -> None:
        if hook is not None and opener is not None:
            raise BlockUsageError("give BlockLayer a hook client or an Opener, not both")
        self.opener = opener if opener is not None else Opener(hook)
        #: The QEMU line modelled, where behaviour differs (a sync=none mirror's pivot).
        self.qemu_version = qemu_version
        #: Nodes a pivot left with a read-write fd that only quit drops (10.0).
        self.read_write_until_quit: list[FormatNode] = []
        self.drives: dict[str, Drive] = {}
        self._open_files: list[ProtocolNode] = []
        self._closed = False
        #: Node holders outside ``drives`` (cdrom trays, jobs): each returns its nodes.
        self.extra_users: list[Callable[[], list[FormatNode]]] = []
        #: Called first by :meth:`quit` (trays close their media, jobs are cancelled).
        self.quit_hooks: list[Callable[[], None]] = []
        #: QMP events so far, oldest first (``{"event": NAME, "data": {...}}``).
        self.events: list[dict[str, Any]] = []

    # -- public API: what QEMU's command line and monitor do -----------------

    @property
    def trace(self) -> list[OpenEvent]:
        """Every open request so far, as the broker saw it."""
        return self.opener.trace

    def attach(self, attach: Attach, *, tmpdir: str | None = None) -> FormatNode:
        """The image ``attach`` describes, as QEMU's command line attaches it.

        ``-drive`` (:meth:`drive_add`) or ``-blockdev`` (:meth:`blockdev_add`),
        then its ``-device``, if any; a cdrom goes to the caller's trays
        (:mod:`testbed.block.media`), not here.  ``tmpdir`` is where
        ``snapshot`` puts its temporary overlay.
        """
        if attach.cdrom:
            raise BlockUsageError(f"drive {attach.node!r} is a cdrom: attach it through Media")
        if attach.kind is AttachKind.BLOCKDEV:
            top = self.blockdev_add(attach.blockdev_options())
        else:
            top = self.drive_add(
                filename=attach.filename,
                fmt=attach.fmt,
                drive_id=attach.node,
                read_only=attach.effective_read_only,
                cache_direct=attach.cache_direct,
                snapshot=attach.snapshot,
                tmpdir=tmpdir,
            )
        if attach.device is not None:
            self.attach_device(attach.node)
        return top

    def drive_add(
        self,
        *,
        filename: str,
        fmt: str | None = None,
        drive_id: str = "drive0",
        if_none: bool = True,
        read_only: bool = False,
        cache_direct: bool = False,
        snapshot: bool = False,
        tmpdir: str | None = None,
    ) -> FormatNode:
        """``-drive file=...,if=none,id=...`` at start-up (``auto-read-only=on``).

        A ``json:{...}`` file name names its drivers, so the protocol is not
        probed; ``snapshot`` (``snapshot=on`` or ``-snapshot``) opens the
        image read-only under a temporary qcow2 overlay in ``tmpdir``
        (:mod:`testbed.block.tempsnap`).
        """
        path = filename
        if not path:
            raise BlockError("drive_add: no file name given")
        name = drive_id
        self._check_new_id(name)
        probe = True
        if path.startswith("json:"):
            from testbed.block.options import json_filename

            fmt, path = json_filename(path, fmt)
            probe = False
        opts = OpenOptions(
            read_only=read_only or snapshot,
            auto_read_only=not read_only and not snapshot,
            cache_direct=cache_direct,
        )
        top = self._open_image(path, fmt=fmt, probe=probe, opts=opts, node_name=name)
        if snapshot:
            from testbed.block.tempsnap import append_temp_snapshot

            with self._undo_tree_on_error(top):
                top = append_temp_snapshot(self, top, tmpdir=tmpdir)
        self.drives[name] = Drive(id=name, top=top)
        if not if_none:
            self.attach_device(name)
        return top

    def blockdev_add(
        self,
        options: Mapping[str, Any] | None = None,
        *,
        driver: str | None = None,
        node_name: str | None = None,
        filename: str | None = None,
        read_only: bool = False,
        cache_direct: bool = False,
    ) -> FormatNode:
        """``-blockdev`` / QMP ``blockdev-add`` with a ``file`` child of driver ``file``."""
        if options is None:
            options = {
                "driver": driver,
                "node-name": node_name,
                "read-only": read_only,
                "cache": {"direct": cache_direct},
                "file": {"driver": "file", "filename": filename},
            }
        spec = _parse_blockdev(options)
        self._check_new_id(spec.name)
        file_node = None
        if spec.file_ref is not None:
            file_node = self._drive(spec.file_ref).top.file.node
        backing = spec.backing
        top = self._open_image(
            spec.path,
            fmt=spec.fmt,
            probe=False,
            opts=spec.opts,
            node_name=spec.name,
            no_backing=backing is not _OPEN_BY_NAME,
            file_node=file_node,
        )
        if isinstance(backing, str):
            top.backing = self._drive(backing).top
        self.drives[spec.name] = Drive(id=spec.name, top=top)
        return top

    def blockdev_del(self, node_name: str) -> None:
        """QMP ``blockdev-del``: close a node nobody uses."""
        drive = self._drive(node_name)
        if drive.device:
            raise BlockError(f"node {node_name!r} is in use by a device")
        if self._users(drive.top, ignore=drive):
            raise BlockError(f"Node {node_name!r} is busy: another node uses it")
        del self.drives[node_name]
        self._close_tree(drive.top)

    # -- what the operation modules (jobs, media, reopen) build on ------------------

    def drive_or_node(self, name: str) -> Drive:
        """The drive (BlockBackend) or named node ``name``."""
        return self._drive(name)

    def is_named(self, node: FormatNode) -> bool:
        """Whether ``node`` is the top of a drive or a named node (so it stays open)."""
        return any(d.top is node for d in self.drives.values())

    def close_node(self, node: FormatNode) -> None:
        """Close ``node`` and what only it holds (write permission dropped first)."""
        node.writers = 0
        self._close_tree(node)

    def open_medium(self, path: str, fmt: str | None, *, node_name: str) -> FormatNode:
        """A removable medium: read-only, the protocol probed (``blockdev-change-medium``)."""
        opts = OpenOptions(read_only=True, auto_read_only=False, cache_direct=False)
        return self._open_image(path, fmt=fmt, probe=True, opts=opts, node_name=node_name)

    def open_image(
        self,
        path: str,
        *,
        fmt: str | None,
        probe: bool,
        opts: OpenOptions,
        node_name: str,
        no_backing: bool = False,
    ) -> FormatNode:
        """Open an image and (unless ``no_backing``) its chain, as ``bdrv_open`` does.

        For the operation modules (job targets, temporary overlays); the node is
        not a drive: the caller attaches it.
        """
        return self._open_image(
            path, fmt=fmt, probe=probe, opts=opts, node_name=node_name, no_backing=no_backing
        )

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """Record a QMP event (a scenario's ``wait`` looks for it)."""
        self.events.append({"event": event, "data": data})

    def attach_device(self, drive_id: str) -> None:
        """``-device virtio-blk-pci,drive=ID``: the device takes write permission."""
        drive = self._drive(drive_id)
        if drive.device:
            raise BlockError(f"drive {drive_id!r} already has a device")
        drive.device = True
        if not drive.top.read_only:
            drive.top.writers += 1
            drive.top.refresh_perms()

    def read(self, drive_or_node: str, offset: int, length: int) -> bytes:
        """A guest read of ``length`` bytes at ``offset``."""
        top = self._drive(drive_or_node).top
        _check_range(top, offset, length)
        return top.read(offset, length)

    def write(self, drive_or_node: str, offset: int, data: bytes) -> None:
        """A guest write (to the top of the chain)."""
        top = self._drive(drive_or_node).top
        _check_range(top, offset, len(data))
        top.write(offset, data)

    def virtual_size(self, drive_or_node: str) -> int:
        return self._drive(drive_or_node).top.virtual_size

    def top(self, drive_or_node: str) -> FormatNode:
        return self._drive(drive_or_node).top

    def blockdev_snapshot_sync(
        self,
        device: str | None = None,
        snapshot_file: str | None = None,
        fmt: str = "qcow2",
        mode: str = "absolute-paths",
        *,
        node_name: str | None = None,
        snapshot_node_name: str | None = None,
    ) -> FormatNode:
        """QMP ``blockdev-snapshot-sync`` (``external_snapshot_prepare`` + commit)."""
        target = device or node_name
        if not target or not snapshot_file:
            raise BlockError("blockdev-snapshot-sync needs a device (or node-name) and a file")
        if mode not in ("absolute-paths", "existing"):
            raise BlockError(f"snapshot mode {mode!r} is not absolute-paths or existing")
        drive = self._drive(target)
        old = drive.top
        if snapshot_node_name and snapshot_node_name in self.drives:
            raise BlockError(f"node name {snapshot_node_name!r} is already in use")
        if mode == "absolute-paths":
            self._create_overlay(snapshot_file, fmt, old)
        opts = OpenOptions(
            read_only=old.read_only,
            auto_read_only=old.auto_read_only,
            cache_direct=old.cache_direct,
        )
        new = self._open_image(
            snapshot_file,
            fmt=fmt,
            probe=True,
            opts=opts,
            node_name=snapshot_node_name or f"{target}-overlay",
            no_backing=True,
        )
        # bdrv_append: the overlay takes the old top's place and users.
        new.backing = old
        new.writers, old.writers = old.writers, 0
        drive.top = new
        new.refresh_perms()
        if not old.read_only:
            old.read_only = True
            for child in old.children():
                child.node.make_read_only()
        return new

    def hmp_snapshot_blkdev(
        self,
        device: str,
        snapshot_file: str | None = None,
        fmt: str = "qcow2",
    ) -> FormatNode:
        """HMP ``snapshot_blkdev DEVICE FILE [FORMAT]``: blockdev-snapshot-sync, absolute-paths."""
        if not snapshot_file:
            raise BlockError("snapshot_blkdev: a snapshot file name is required")
        return self.blockdev_snapshot_sync(device, snapshot_file, fmt, "absolute-paths")

    def _drop_left_read_write(self, top: FormatNode) -> None:
        """Quit on QEMU 10.0 after a sync=none mirror: the chain drops to read-only
        top down, the old top (left read-write by the pivot) after the new one."""
        below = [n for n in top.chain()[1:] if n in self.read_write_until_quit]
        if not below:
            return
        for node in (top, *below):
            for child in node.children():
                child.node.make_read_only()

    def qemu_at_least(self, version: str) -> bool:
        def key(v: str) -> tuple[int, ...]:
            return tuple(int(x) for x in v.split("."))

        return key(self.qemu_version) >= key(version)

    def quit(self) -> None:
        """QMP ``quit``: devices let go, then every node closes."""
        if self._closed:
            return
        self._closed = True
        for hook in self.quit_hooks:
            hook()
        for drive in list(self.drives.values()):
            drive.top.writers = 0
            if not drive.top.closed:
                drive.top.refresh_perms()
                self._drop_left_read_write(drive.top)
        for name in list(self.drives):
            self._close_tree(self.drives.pop(name).top)

    def close(self) -> None:
        self.quit()

    def __enter__(self) -> BlockLayer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.quit()

    # -- opening --------------------------------------------------------------

    def _open_protocol(self, path: str, *, probe: bool, opts: OpenOptions) -> ProtocolNode:
        node: ProtocolNode
        if probe:
            # bdrv_find_protocol asks find_hdev_driver first, even for "fat:".
            self.opener.probe(path)
        if path.startswith("fat:"):
            node = self._open_vvfat(path)
        else:
            node = FileNode(
                self.opener,
                path,
                read_only=opts.read_only,
                auto_read_only=opts.auto_read_only,
                cache_direct=opts.cache_direct,
            )
        self._open_files.append(node)
        return node

    def _open_vvfat(self, path: str) -> VVFatNode:
        from testbed.block import vvfat

        options = vvfat.parse_fat_filename(path)
        return VVFatNode(path, vvfat.VVFat(options, qemu_open=self.opener.qemu_open))

    def _open_image(
        self,
        path: str,
        *,
        fmt: str | None,
        probe: bool,
        opts: OpenOptions,
        node_name: str,
        no_backing: bool = False,
        chain: tuple[tuple[int, int], ...] = (),
        file_node: ProtocolNode | None = None,
    ) -> FormatNode:
        """``bdrv_open_inherit``: protocol node, format, driver open, backing.

        ``file_node`` is a protocol node another named node already holds
        (``"file": "node-name"``): it is used as it is, nothing is opened.
        """
        owned = file_node is None
        if file_node is not None:
            file, path = file_node, file_node.filename
        else:
            file = self._open_protocol(path, probe=probe, opts=opts)
        with self._undo_on_error(file, owned=owned):
            key = self._check_locks(file, chain) if owned else ()
            if fmt is None:
                fmt = self._probe_format(file)
            elif fmt == "file":
                fmt = formats.BYTES_FORMAT  # a bare protocol node: the same bytes, no format
            driver = _driver(fmt)
            role = driver.file_role
            if owned:
                file.set_write(role == ChildRole.METADATA and not opts.read_only)
            ctx = _ChildOpener(self, opts, driver)
            try:
                image: FormatImage = driver.open(file, ctx)
            except BaseException:
                self._close_children(ctx.children)
                raise
            node = FormatNode(
                driver=fmt,
                node_name=node_name,
                filename=path,
                image=image,
                file=Child(node=file, role=role, name="file", owned=owned),
                read_only=opts.read_only,
                auto_read_only=opts.auto_read_only,
                cache_direct=opts.cache_direct,
                others=ctx.children,
            )
        if image.backing_filename and not no_backing:
            try:
                node.backing = self._open_backing(node, opts, (*chain, *key))
            except BaseException:
                self._close_tree(node)
                raise
        return node

    def _open_backing(
        self, node: FormatNode, opts: OpenOptions, chain: tuple[tuple[int, int], ...]
    ) -> FormatNode:
        """``bdrv_open_backing_file``: read-only, name relative to the overlay."""
        assert node.image.backing_filename is not None
        path = path_combine(node.filename, node.image.backing_filename)
        backing_opts = OpenOptions(
            read_only=True, auto_read_only=opts.auto_read_only, cache_direct=opts.cache_direct
        )
        return self._open_image(
            path,
            fmt=node.image.backing_format,
            probe=True,
            opts=backing_opts,
            node_name=f"{node.node_name}-backing",
            chain=chain,
        )

    def _probe_format(self, file: ProtocolNode) -> str:
        """``find_image_format`` + ``bdrv_probe_all``: the highest score wins, first on ties."""
        if file.size() == 0:
            return formats.BYTES_FORMAT
        buf = file.pread(0, PROBE_BYTES)
        best, best_score = None, 0
        for name, driver in formats.all_drivers().items():
            score = driver.probe(buf, file.filename)
            if score > best_score:
                best, best_score = name, score
        if best is None:
            raise BlockError(f"Could not determine image format of {file.filename!r}")
        return best

    def _check_locks(
        self, file: ProtocolNode, chain: tuple[tuple[int, int], ...]
    ) -> tuple[tuple[int, int], ...]:
        """The same-process lock conflict and the backing loop (see the module doc)."""
        if not isinstance(file, FileNode):
            return ()
        st = os.fstat(file.fd)
        key = (st.st_dev, st.st_ino)
        for other in self._open_files:
            if other is file or not isinstance(other, FileNode) or other.fd < 0:
                continue
            ost = os.fstat(other.fd)
            if (ost.st_dev, ost.st_ino) != key:
                continue
            # Locks follow permissions, not descriptors: a file node nobody
            # writes through holds no write lock, even when open O_RDWR.
            parents = self._parents(other)
            written = any(p.wants_write(c) for p, c in parents)
            if written or (file.writable_fd and parents):
                raise BlockError(
                    f'Failed to get shared "write" lock on {file.filename!r}: '
                    f"it is already open for writing as {other.filename!r}"
                )
        if key in chain:
            raise BlockError(f"backing loop: {file.filename!r} is already in this backing chain")
        return (key,)

    def _create_overlay(self, path: str, fmt: str, old: FormatNode) -> None:
        """``bdrv_img_create`` as ``external_snapshot_prepare`` calls it."""
        creators = [name for name, d in formats.all_drivers().items() if d.creates_overlays]
        if fmt not in creators:
            raise BlockError(f"the model creates {', '.join(creators)} overlays only, not {fmt!r}")
        driver = _driver(fmt)

        # bdrv_img_create and bdrv_create_file each call bdrv_find_protocol.
        self.opener.probe(path)
        self.opener.probe(path)
        fd = self.opener.qemu_create(path, os.O_RDWR, 0o644)  # raw_co_create
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        self.opener.probe(path)  # qcow2_co_create_opts: bdrv_open of the protocol
        fd = self.opener.qemu_open(path, os.O_RDWR)
        try:
            driver.create(
                FdFile(fd, path),
                size=old.virtual_size,
                backing_file=old.filename,
                backing_format=old.driver if old.driver != "file" else formats.BYTES_FORMAT,
            )
        finally:
            os.close(fd)

    # -- closing --------------------------------------------------------------

    @contextlib.contextmanager
    def _undo_on_error(self, file: ProtocolNode, *, owned: bool = True) -> Iterator[None]:
        try:
            yield
        except BaseException:
            if owned:
                self._close_children([Child(node=file, role=ChildRole.DATA, name="file")])
            raise

    @contextlib.contextmanager
    def _undo_tree_on_error(self, node: FormatNode) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self._close_tree(node)
            raise

    def _close_children(self, children: list[Child]) -> None:
        for child in children:
            with contextlib.suppress(OSError):
                child.node.set_write(False)
            child.node.close()
            if child.node in self._open_files:
                self._open_files.remove(child.node)

    def _close_tree(self, node: FormatNode) -> None:
        """``bdrv_close``: the driver, then children newest first (backing, then file).

        A node still used by a named node or a device (a node reference, a
        job's target after a pivot) stays open; a shared protocol child
        belongs to the node that opened it.
        """
        if node.closed:
            return
        node.closed = True
        node.image.close()
        if node.backing is not None:
            backing, node.backing = node.backing, None
            if not self._users(backing):
                self._close_tree(backing)
        self._close_children(
            [c for c in node.children() if c.owned and not self._protocol_users(c.node, node)]
        )

    def _users(self, node: FormatNode, *, ignore: Drive | None = None) -> bool:
        """Whether a live drive, named node or overlay still holds ``node``."""
        for d in self.drives.values():
            if d is ignore or d.top.closed:
                continue
            if d.top is node or any(n is node for n in d.top.chain()[1:]):
                return True
            if node.file.owned and any(
                c.node is node.file.node and not c.owned for c in d.top.children()
            ):
                return True
        return any(node in holder() for holder in self.extra_users)

    def _parents(self, proto: ProtocolNode) -> list[tuple[FormatNode, Child]]:
        """The live format nodes over ``proto``, with the edge."""
        seen: set[int] = set()
        out = []
        roots = [d.top for d in self.drives.values()]
        roots += [n for holder in self.extra_users for n in holder()]
        for root in roots:
            for n in root.chain():
                if id(n) in seen or n.closed:
                    continue
                seen.add(id(n))
                out += [(n, c) for c in n.children() if c.node is proto]
        return out

    def _protocol_users(self, proto: ProtocolNode, owner: FormatNode) -> bool:
        for d in self.drives.values():
            for n in d.top.chain():
                if n is not owner and not n.closed and any(c.node is proto for c in n.children()):
                    return True
        return False

    # -- lookups --------------------------------------------------------------

    def _drive(self, name: str) -> Drive:
        try:
            return self.drives[name]
        except KeyError:
            known = ", ".join(sorted(self.drives)) or "none"
            raise BlockError(f"no drive or node named {name!r} (known: {known})") from None

    def _check_new_id(self, name: str) -> None:
        if self._closed:
            raise BlockError("the block layer has quit")
        if name in self.drives:
            raise BlockError(f"a drive or node named {name!r} already exists")


def _driver(fmt: str) -> type[FormatDriver]:
    try:
        return formats.get_driver(fmt)
    except KeyError as err:
        raise BlockError(f"Unknown driver {fmt!r}: {err.args[0]}") from None


def _check_range(node: FormatNode, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > node.virtual_size:
        raise BlockError(
            f"{length} bytes at {offset} lie outside {node.filename!r} ({node.virtual_size} bytes)"
        )


class _OpenByName:
    """``backing`` absent from the options: open the image's own backing file."""


_OPEN_BY_NAME = _OpenByName()


@dataclass(frozen=True, kw_only=True)
class BlockdevSpec:
    """What ``blockdev-add`` asks for, from its JSON shape."""

    fmt: str
    name: str
    #: The protocol file name ("" when ``file`` is a node reference).
    path: str
    #: ``"file": "node-name"``: an existing node's protocol child.
    file_ref: str | None
    #: A node name, None (``"backing": null``: no backing) or open by name.
    backing: str | _OpenByName | None
    opts: OpenOptions


def _parse_blockdev(options: Mapping[str, Any]) -> BlockdevSpec:
    """``blockdev-add``'s options: a nested ``file`` object or a node reference."""
    driver = options.get("driver")
    name = options.get("node-name")
    if not isinstance(driver, str) or not driver:
        raise BlockError("blockdev-add: 'driver' is required")
    if not isinstance(name, str) or not name:
        raise BlockError("blockdev-add: 'node-name' is required")
    file_ref = None
    path = ""
    if driver == "file":
        file_opts: Mapping[str, Any] = options
    else:
        file = options.get("file")
        if isinstance(file, str):
            file_ref, file_opts = file, {}
        elif isinstance(file, Mapping):
            file_opts = file
            if file_opts.get("driver") != "file":
                raise BlockError(
                    f"blockdev-add: file driver {file_opts.get('driver')!r} is not "
                    "modelled (only 'file')"
                )
        else:
            raise BlockError("blockdev-add: 'file' must be an object or a node name")
    if file_ref is None:
        path = file_opts.get("filename")  # type: ignore[assignment]
        if not isinstance(path, str) or not path:
            raise BlockError("blockdev-add: file.filename is required")
    backing: str | _OpenByName | None = _OPEN_BY_NAME
    if "backing" in options:
        value = options["backing"]
        if value is not None and not isinstance(value, str):
            raise BlockError("blockdev-add: 'backing' must be a node name or null")
        backing = value
    cache = options.get("cache") or {}
    read_only = _flag(options.get("read-only", False))
    opts = OpenOptions(
        read_only=read_only,
        auto_read_only=_flag(file_opts.get("auto-read-only", options.get("auto-read-only", False))),
        cache_direct=_flag(cache.get("direct", False) if isinstance(cache, Mapping) else False),
    )
    return BlockdevSpec(
        fmt=driver, name=name, path=path, file_ref=file_ref, backing=backing, opts=opts
    )


def _flag(value: Any) -> bool:
    """A boolean option as QMP (true/false) or the command line (on/off) spells it."""
    if isinstance(value, str):
        if value not in ("on", "off", "true", "false"):
            raise BlockError(f"{value!r} is not a boolean (on/off)")
        return value in ("on", "true")
    return bool(value)


__all__ = ["BlockLayer", "Drive", "OpenOptions"]
