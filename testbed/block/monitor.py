"""The model as a QEMU process: a command line, QMP commands, HMP lines, events.

:class:`ModelMachine` takes the same ``-drive``/``-blockdev``/``-device``/
``-snapshot`` options a scenario gives QEMU and the same QMP commands (by
name, with QEMU's JSON arguments), so one scenario drives the model and
QEMU alike.  Each QMP command is one entry of :data:`COMMANDS`; a command
the model does not implement is an error naming it.

A broker restart (extension patch 0007): :meth:`ModelMachine.pass_hook`
is the model's ``getfd`` (a new broker connection under a name), and QMP
``open-hook-set`` with that ``fdname`` makes it the opener's hook;
``query-open-hook`` answers as the patch does.  Jobs finish at once
and leave their events in :attr:`ModelMachine.events`, where :meth:`wait`
finds them (the timeout only matters for a real QEMU).
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable, Sequence
from typing import Any

from testbed.block.jobs import JobManager
from testbed.block.layer import BlockLayer
from testbed.block.media import Media
from testbed.block.opener import HookLike
from testbed.block.options import parse_blockdev_arg, parse_keyval
from testbed.block.reopen import blockdev_reopen
from testbed.errors import BlockError, CommandLineError, WaitTimeout
from testbed.qemu.commandline import parse_drive

#: Devices that take write permission on their drive.
WRITING_DEVICES = frozenset({"virtio-blk-pci", "virtio-blk", "ide-hd", "scsi-hd", "floppy"})
#: Devices with removable, read-only media.
CDROM_DEVICES = frozenset({"ide-cd", "scsi-cd"})

Handler = Callable[["ModelMachine", dict[str, Any]], Any]


class ModelMachine:
    """A :class:`BlockLayer` driven like a QEMU process."""

    def __init__(self, layer: BlockLayer, *, tmpdir: str | None = None) -> None:
        self.layer = layer
        self.jobs = JobManager(layer)
        self.media = Media(layer)
        self.tmpdir = tmpdir
        self._seen = 0
        #: Broker connections passed by name (the model's ``getfd``), until used.
        self.hook_fds: dict[str, HookLike] = {}

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.layer.events

    # -- the command line ----------------------------------------------------------

    def launch(self, args: Sequence[str]) -> None:
        """Apply QEMU's block options in order (``-snapshot`` applies to every ``-drive``)."""
        words = list(args)
        snapshot_all = "-snapshot" in words
        i = 0
        while i < len(words):
            word = words[i]
            if word == "-snapshot":
                i += 1
                continue
            if word in ("-drive", "-blockdev", "-device") and i + 1 < len(words):
                value = words[i + 1]
                if word == "-drive":
                    self._drive(value, snapshot_all)
                elif word == "-blockdev":
                    self.layer.blockdev_add(parse_blockdev_arg(value))
                else:
                    self._device(value)
                i += 2
                continue
            i += 1  # -S, -machine and the rest do not open images

    def _drive(self, text: str, snapshot_all: bool) -> None:
        try:
            attach = parse_drive(text)
        except CommandLineError as err:
            raise BlockError(str(err)) from err
        if attach.cdrom:
            self.media.add_drive(attach.node, attach.filename or None, attach.fmt)
            return
        if snapshot_all:
            attach = dataclasses.replace(attach, snapshot=True)
        self.layer.attach(attach, tmpdir=self.tmpdir)

    def _device(self, text: str) -> None:
        opts = parse_keyval(text, implied="driver")
        driver, drive = opts.get("driver"), opts.get("drive")
        if not isinstance(drive, str):
            return
        if driver in CDROM_DEVICES:
            self.media.attach(drive, opts.get("id"))
        elif driver in WRITING_DEVICES:
            self.layer.attach_device(drive)
        else:
            raise BlockError(f"-device {driver}: the model knows no such block device")

    # -- the monitor -----------------------------------------------------------------

    def pass_hook(self, fdname: str, hook: HookLike) -> None:
        """``getfd``: keep ``hook`` (a new broker connection) under ``fdname``."""
        if not fdname or fdname[0].isdigit():
            raise BlockError(f"getfd: invalid fdname {fdname!r}")
        old = self.hook_fds.pop(fdname, None)
        close = getattr(old, "close", None)
        if callable(close):
            close()  # QEMU closes an fd passed again under the same name
        self.hook_fds[fdname] = hook

    def open_hook_set(self, fdname: str) -> None:
        """QMP ``open-hook-set``: the connection named ``fdname`` becomes the hook."""
        hook = self.hook_fds.get(fdname)
        if hook is None:
            raise BlockError(f"open-hook-set: file descriptor name {fdname!r} not found")
        self.layer.opener.set_hook(hook)
        del self.hook_fds[fdname]

    def qmp(self, command: str, **arguments: Any) -> Any:
        handler = COMMANDS.get(command)
        if handler is None:
            raise BlockError(f"the model does not implement QMP {command!r}")
        return handler(self, arguments)

    def hmp(self, line: str) -> str:
        words = shlex.split(line)
        if not words:
            raise BlockError("empty HMP line")
        if words[0] == "snapshot_blkdev" and len(words) >= 3:
            self.layer.hmp_snapshot_blkdev(
                words[1], words[2], words[3] if len(words) > 3 else "qcow2"
            )
            return ""
        if words[0] == "qemu-io" and len(words) == 3:
            return _qemu_io(self.layer, words[1], words[2])
        raise BlockError(f"the model does not implement HMP {line!r}")

    def wait(self, event: str, *, job: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """The next ``event`` (for ``job``) not seen by an earlier wait."""
        for i in range(self._seen, len(self.events)):
            e = self.events[i]
            if e["event"] == event and (job is None or e["data"].get("device") == job):
                self._seen = i + 1
                return e
        what = f"{event} of job {job!r}" if job else event
        raise WaitTimeout(f"the model's {what} (jobs finish at once: it never came)", timeout)

    def quit(self) -> None:
        self.layer.quit()


def _qemu_io(layer: BlockLayer, device: str, command: str) -> str:
    words = command.split()
    if len(words) == 3 and words[0] == "read":
        offset, length = int(words[1], 0), int(words[2], 0)
        layer.read(device, offset, length)
        return f"read {length}/{length} bytes at offset {offset}\n"
    raise BlockError(f"the model's qemu-io knows only 'read OFFSET LENGTH', not {command!r}")


def _str(args: dict[str, Any], key: str, *, required: bool = True) -> Any:
    value = args.get(key)
    if required and not isinstance(value, str):
        raise BlockError(f"missing or non-string argument {key!r}")
    return value


def _device(args: dict[str, Any]) -> str:
    value = args.get("device") or args.get("node-name")
    if not isinstance(value, str):
        raise BlockError("missing argument 'device' (or 'node-name')")
    return value


def _job_id(args: dict[str, Any]) -> str | None:
    value = args.get("job-id")
    return value if isinstance(value, str) else None


def _blockdev_add(m: ModelMachine, a: dict[str, Any]) -> None:
    m.layer.blockdev_add(a)  # QMP answers {}, not the node


def _snapshot_sync(m: ModelMachine, a: dict[str, Any]) -> None:
    m.layer.blockdev_snapshot_sync(
        a.get("device"),
        _str(a, "snapshot-file"),
        a.get("format", "qcow2"),
        a.get("mode", "absolute-paths"),
        node_name=a.get("node-name"),
        snapshot_node_name=a.get("snapshot-node-name"),
    )


def _commit(m: ModelMachine, a: dict[str, Any]) -> None:
    m.jobs.commit(
        _device(a),
        job_id=_job_id(a),
        top=a.get("top-node") or a.get("top"),
        base=a.get("base-node") or a.get("base"),
        backing_file=a.get("backing-file"),
    )


def _stream(m: ModelMachine, a: dict[str, Any]) -> None:
    m.jobs.stream(_device(a), job_id=_job_id(a), base=a.get("base-node") or a.get("base"))


def _copy(start: Callable[..., object], node_target: bool) -> Handler:
    """A mirror or backup command: the two take the same arguments (``start`` picks the job:
    ``JobManager.mirror`` or ``JobManager.backup``)."""

    def run(m: ModelMachine, a: dict[str, Any]) -> None:
        start(
            m.jobs,
            _device(a),
            job_id=_job_id(a),
            target=_str(a, "target"),
            sync=_str(a, "sync"),
            fmt=a.get("format"),
            mode=a.get("mode", "absolute-paths"),
            node_target=node_target,
        )

    return run


def _tray(args: dict[str, Any]) -> str:
    value = args.get("id") or args.get("device")
    if not isinstance(value, str):
        raise BlockError("missing argument 'id' (or 'device')")
    return value


#: QMP command -> what the model does; one line per command.
COMMANDS: dict[str, Handler] = {
    "blockdev-add": lambda m, a: _blockdev_add(m, a),
    "blockdev-del": lambda m, a: m.layer.blockdev_del(_str(a, "node-name")),
    "blockdev-snapshot-sync": lambda m, a: _snapshot_sync(m, a),
    "blockdev-reopen": lambda m, a: blockdev_reopen(m.layer, a.get("options") or []),
    "block-commit": _commit,
    "block-stream": _stream,
    "drive-mirror": _copy(JobManager.mirror, node_target=False),
    "blockdev-mirror": _copy(JobManager.mirror, node_target=True),
    "drive-backup": _copy(JobManager.backup, node_target=False),
    "blockdev-backup": _copy(JobManager.backup, node_target=True),
    "block-job-complete": lambda m, a: m.jobs.complete(_device(a)),
    "block-job-cancel": lambda m, a: m.jobs.cancel(_device(a), force=bool(a.get("force"))),
    "query-block-jobs": lambda m, a: m.jobs.query(),
    "blockdev-change-medium": lambda m, a: m.media.change_medium(
        _tray(a), _str(a, "filename"), a.get("format")
    ),
    "eject": lambda m, a: m.media.eject(_tray(a), force=bool(a.get("force"))),
    "blockdev-open-tray": lambda m, a: m.media.open_tray(_tray(a), force=bool(a.get("force"))),
    "blockdev-close-tray": lambda m, a: m.media.close_tray(_tray(a)),
    "blockdev-remove-medium": lambda m, a: m.media.remove_medium(_tray(a)),
    "blockdev-insert-medium": lambda m, a: m.media.insert_medium(_tray(a), _str(a, "node-name")),
    "human-monitor-command": lambda m, a: m.hmp(_str(a, "command-line")),
    "open-hook-set": lambda m, a: m.open_hook_set(_str(a, "fdname")),
    "query-open-hook": lambda m, a: m.layer.opener.hook_stats(),
}
