"""The frozen configuration of a QEMU run and the command line built from it.

Nothing here starts a process: :func:`build_argv` is a pure function of a
:class:`MachineConfig` and the descriptor numbers QEMU will inherit, so the
command line can be checked without QEMU.

The image options are built here too, and only here: an :class:`Attach`
describes one image given to QEMU (file, format, id, read-only, cache,
device), :meth:`Attach.argv` is its ``-drive``/``-blockdev`` words and
:meth:`Attach.blockdev_options` its ``blockdev-add`` tree; the block-layer
model reads the same description (:func:`parse_drive`,
``BlockLayer.attach``).  Option trees that come from elsewhere (the fd-set
oracle's rewritten scenarios) are written with :func:`drive_keyval` and
:func:`blockdev_json`.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.block.options import flag, parse_keyval
from testbed.errors import CommandLineError
from testbed.qemu.binaries import STOCK_QEMU

#: Where Debian keeps the firmware (seabios, iPXE option ROMs, qemu-system-data).
FIRMWARE_DIRS: tuple[Path, ...] = (
    Path("/usr/share/seabios"),
    Path("/usr/lib/ipxe/qemu"),
    Path("/usr/share/qemu"),
)

ACCELERATORS = ("tcg", "kvm")

# Mounts an empty tmpfs over each directory before the "--", then execs the
# rest.  Run by ``sh -c`` in the new mount namespace made by unshare(1).
_HIDE_SCRIPT = (
    'while [ "$1" != -- ]; do '
    'mount -t tmpfs -o mode=0755 testbed-hidden "$1" || '
    '{ echo "testbed: cannot hide $1 with a tmpfs" >&2; exit 125; }; '
    'shift; done; shift; exec "$@"'
)


@dataclass(frozen=True, kw_only=True)
class MachineConfig:
    """How to run one QEMU.

    ``hook`` gives QEMU ``-open-hook-fd`` on one end of a socket pair (only
    the patched binary knows the option); ``serial`` puts the first serial
    port on another socket pair, for a console the caller drives.
    ``hide_dirs`` run QEMU in a new mount namespace where each of those
    directories is an empty tmpfs: what QEMU then opens there, it can only
    have got through the hook.  ``wrapper`` goes before everything (for
    example ``("strace", "-f", "-o", "trace", "-e", "trace=openat")``).
    ``line_buffered`` runs QEMU under ``stdbuf -oL``: HMP ``qemu-io`` prints
    to QEMU's stdout (the log), which is otherwise flushed only at exit.
    ``env`` adds variables to QEMU's environment (e.g. ``TMPDIR`` for
    ``-snapshot``).  ``cwd`` is QEMU's working directory (default: ours),
    against which it resolves relative names.
    """

    binary: Path = STOCK_QEMU
    args: tuple[str, ...] = ()
    machine: str = "none"
    accel: str = "tcg"
    hook: bool = False
    serial: bool = False
    hide_dirs: tuple[Path, ...] = ()
    pass_fds: tuple[int, ...] = ()
    firmware_dirs: tuple[Path, ...] = FIRMWARE_DIRS
    wrapper: tuple[str, ...] = ()
    line_buffered: bool = True
    env: tuple[tuple[str, str], ...] = ()
    cwd: Path | None = None
    log_path: Path | None = None
    launch_timeout: float = 60.0
    command_timeout: float = 60.0
    shutdown_timeout: float = 15.0

    def __post_init__(self) -> None:
        if self.accel not in ACCELERATORS:
            raise CommandLineError(f"accel {self.accel!r} is not one of {', '.join(ACCELERATORS)}")
        for name in ("launch_timeout", "command_timeout", "shutdown_timeout"):
            if getattr(self, name) <= 0:
                raise CommandLineError(f"{name} must be positive, not {getattr(self, name)!r}")
        for d in self.hide_dirs:
            if not d.is_absolute():
                raise CommandLineError(f"hide_dirs entry {str(d)!r} is not an absolute path")
        for fd in self.pass_fds:
            if fd <= 2:
                raise CommandLineError(f"pass_fds entry {fd} is stdin, stdout or stderr")
        for fw in self.firmware_dirs:
            if any(fw == d or d in fw.parents for d in self.hide_dirs):
                raise CommandLineError(f"firmware directory {fw} would be hidden by hide_dirs")


def build_argv(
    config: MachineConfig,
    *,
    qmp_fd: int,
    hook_fd: int | None = None,
    serial_fd: int | None = None,
) -> list[str]:
    """The full command line: wrapper, mount-namespace prefix, QEMU and its options."""
    if config.hook != (hook_fd is not None):
        raise CommandLineError("hook_fd must be given exactly when config.hook is set")
    if config.serial != (serial_fd is not None):
        raise CommandLineError("serial_fd must be given exactly when config.serial is set")
    qemu = ["stdbuf", "-oL", "-eL"] if config.line_buffered else []
    qemu.append(str(config.binary))
    for fw in config.firmware_dirs:
        qemu += ["-L", str(fw)]
    qemu += [
        "-nodefaults",
        "-display", "none",
        "-machine", config.machine,
        "-accel", config.accel,
        "-chardev", f"socket,id=qmp,fd={qmp_fd}",
        "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip
    if hook_fd is not None:
        qemu += ["-open-hook-fd", str(hook_fd)]
    if serial_fd is not None:
        qemu += ["-chardev", f"socket,id=ser0,fd={serial_fd}", "-serial", "chardev:ser0"]
    qemu += list(config.args)
    if config.hide_dirs:
        qemu = hide_prefix(config.hide_dirs) + qemu
    return list(config.wrapper) + qemu


def hide_prefix(dirs: tuple[Path, ...]) -> list[str]:
    """``unshare`` + ``sh`` words that run the rest in a namespace hiding ``dirs``."""
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _HIDE_SCRIPT, "sh"]
    return prefix + [str(d) for d in dirs] + ["--"]


# -- images ------------------------------------------------------------------------------


class AttachKind(enum.StrEnum):
    """How an image is given to QEMU on the command line."""

    #: ``-drive ...,if=none,id=ID``: a BlockBackend, protocol and format probed
    #: unless named, ``auto-read-only``.
    DRIVE = "drive"
    #: ``-blockdev driver=FMT,node-name=ID,file.driver=file,...``: a named node.
    BLOCKDEV = "blockdev"


@dataclass(frozen=True, kw_only=True)
class Attach:
    """One image attached to QEMU (or to the model): the facts its options are built from.

    ``filename`` is the name as QEMU is given it (a path, ``fat:...``,
    ``json:{...}``; empty only for a cdrom without a medium); ``fmt`` None
    leaves the format to QEMU's probe (``-drive`` only).  ``node`` is the
    ``-drive`` id or the ``-blockdev`` node name.  ``cache`` is ``-drive``'s
    cache mode shorthand (``writeback``), ``cache_direct`` the
    ``cache.direct`` option.  ``drive_extra`` are further ``-drive`` options,
    written after ``format=`` in the order given (the guest boot's legacy
    ``readonly=on`` spelling, which :func:`parse_drive` reads as
    ``read_only``).  ``device`` is the guest device (``virtio-blk-pci``)
    given ``-device DEVICE,drive=NODE``.
    """

    filename: str
    fmt: str | None = None
    node: str = "drive0"
    kind: AttachKind = AttachKind.DRIVE
    read_only: bool = False
    cache_direct: bool = False
    cache: str | None = None
    snapshot: bool = False
    cdrom: bool = False
    drive_extra: tuple[tuple[str, str], ...] = ()
    device: str | None = None

    def __post_init__(self) -> None:
        if not self.node:
            raise CommandLineError("an attached image needs a drive id or node name")
        if not self.filename and not self.cdrom:
            raise CommandLineError(f"drive {self.node!r}: no file name (only a cdrom may be empty)")
        if self.kind is AttachKind.BLOCKDEV:
            if self.fmt is None:
                raise CommandLineError(f"-blockdev {self.node!r} names its driver: give fmt")
            if self.cache or self.snapshot or self.cdrom or self.drive_extra:
                raise CommandLineError(
                    f"-blockdev {self.node!r}: cache=, snapshot=, media= and other -drive "
                    "options do not exist for -blockdev"
                )

    @property
    def effective_read_only(self) -> bool:
        """``read_only``, or the legacy ``readonly=on`` among ``drive_extra``."""
        legacy = dict(self.drive_extra).get("readonly")
        return self.read_only or (legacy is not None and flag(legacy, what="readonly"))

    def drive_arg(self) -> str:
        """The ``-drive`` value."""
        if self.kind is not AttachKind.DRIVE:
            raise CommandLineError(f"{self.node!r} is attached with -blockdev, not -drive")
        opts: dict[str, Any] = {}
        if self.filename:
            opts["file"] = self.filename
        if self.fmt is not None:
            opts["format"] = self.fmt
        opts.update(self.drive_extra)
        if self.cache is not None:
            opts["cache"] = self.cache
        opts["if"] = "none"
        opts["id"] = self.node
        if self.cdrom:
            opts["media"] = "cdrom"
        if self.read_only:
            opts["read-only"] = True
        if self.cache_direct:
            opts["cache.direct"] = True
        if self.snapshot:
            opts["snapshot"] = True
        return drive_keyval(opts)

    def blockdev_options(self) -> dict[str, Any]:
        """The node's ``-blockdev``/``blockdev-add`` options (a format over a ``file`` node).

        ``read-only`` and ``cache`` appear only when set: QEMU's defaults are off.
        """
        opts: dict[str, Any] = {
            "driver": self.fmt,
            "node-name": self.node,
            "file": {"driver": "file", "filename": self.filename},
        }
        if self.read_only:
            opts["read-only"] = True
        if self.cache_direct:
            opts["cache"] = {"direct": True}
        return opts

    def argv(self) -> tuple[str, ...]:
        """The command-line words: ``-drive``/``-blockdev``, then ``-device`` if any."""
        if self.kind is AttachKind.DRIVE:
            words: tuple[str, ...] = ("-drive", self.drive_arg())
        else:
            words = ("-blockdev", blockdev_json(self.blockdev_options()))
        if self.device is not None:
            words += ("-device", f"{self.device},drive={self.node}")
        return words


def parse_drive(text: str) -> Attach:
    """The :class:`Attach` a ``-drive`` value describes, as the model reads it.

    Options the model has no use for (``if``, ``cache=`` modes, ``aio``, ...)
    are dropped; ``readonly`` is ``read-only`` (QEMU's ``drive_new`` renames it).
    """
    opts = parse_keyval(text, implied="file")
    file = opts.get("file")
    cdrom = opts.get("media") == "cdrom"
    if file is not None and not isinstance(file, str):
        raise CommandLineError(f"-drive {text}: only file=NAME is modelled")
    if file is None and not cdrom:
        raise CommandLineError(f"-drive {text}: only file=NAME is modelled")
    fmt = opts.get("format")
    cache = opts.get("cache")
    direct = cache.get("direct", "off") if isinstance(cache, dict) else "off"
    read_only = opts.get("read-only", opts.get("readonly", "off"))
    return Attach(
        filename=file or "",
        fmt=fmt if isinstance(fmt, str) else None,
        node=opts.get("id", "drive0"),
        read_only=flag(read_only, what="read-only"),
        cache_direct=flag(direct, what="cache.direct"),
        snapshot=flag(opts.get("snapshot", "off"), what="snapshot"),
        cdrom=cdrom,
    )


def drive_keyval(tree: Mapping[str, Any], prefix: str = "") -> str:
    """``-drive`` syntax for nested options: ``backing.file.filename=...`` (commas doubled).

    Booleans are written ``on``/``off``; a nested object's keys get its key as prefix.
    """
    out = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.append(drive_keyval(value, f"{prefix}{key}."))
        elif isinstance(value, bool):
            out.append(f"{prefix}{key}={'on' if value else 'off'}")
        else:
            out.append(f"{prefix}{key}={str(value).replace(',', ',,')}")
    return ",".join(x for x in out if x)


def blockdev_json(tree: Mapping[str, Any]) -> str:
    """``-blockdev``'s JSON form of ``tree``; keyval's ``on``/``off`` become JSON booleans."""
    return json.dumps(_booleans(tree))


def _booleans(value: Any) -> Any:
    # -blockdev JSON is typed: "on" would be a string where QEMU wants a bool
    if isinstance(value, Mapping):
        return {k: _booleans(v) for k, v in value.items()}
    if value in ("on", "off"):
        return value == "on"
    return value
