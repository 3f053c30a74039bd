"""The model's one ``qemu_open``: every open of an image file goes through here.

QEMU 7.2's ``util/osdep.c``: ``qemu_open``, ``qemu_create`` and
``qemu_open_old`` all end in ``qemu_open_internal``, which opens
``name`` with ``flags | O_CLOEXEC``.  When that fails with ``EINVAL`` and
``O_DIRECT`` was asked, QEMU opens once more without ``O_DIRECT`` only to
word a better error ("filesystem does not support O_DIRECT"): the second
open is closed at once and the call still fails.  That is the single choke
point where the -open-hook-fd series sends the request to the broker.

:class:`Opener` does the same through a :class:`testbed.transport.HookClient`
(the broker answers) or through ``os.open`` (tests without a broker), and
records an :class:`OpenEvent` per request -- the trace the broker's audit
log would show (path, flags as sent, their names, mode, 0 or ``-errno``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from testbed.errors import BlockUsageError
from testbed.protocol import flag_names

#: ``open``-like: (path, flags, mode) -> fd, or OSError.
RawOpen = Callable[[str, int, int], int]


class HookLike(Protocol):
    """What the opener needs of :class:`testbed.transport.HookClient`."""

    def open(self, path: str, flags: int, mode: int = 0) -> int: ...


@dataclass(frozen=True, kw_only=True)
class OpenEvent:
    """One open request, as the broker sees it."""

    path: str
    flags: int
    mode: int
    #: 0 when a descriptor came back, else the negated errno.
    result: int
    flag_names: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "flags": self.flags,
            "flag_names": list(self.flag_names),
            "mode": self.mode,
            "result": self.result,
        }


def _local_open(path: str, flags: int, mode: int) -> int:
    return os.open(path, flags, mode)


class Opener:
    """``qemu_open`` for the model: through the broker, or locally, traced either way."""

    def __init__(self, hook: HookLike | None = None, *, raw_open: RawOpen | None = None) -> None:
        if hook is not None and raw_open is not None:
            raise BlockUsageError("give the Opener a hook client or a raw open function, not both")
        if hook is not None:
            self._open: RawOpen = hook.open
        else:
            self._open = raw_open or _local_open
        self.via_broker = hook is not None
        self.trace: list[OpenEvent] = []

    def _one(self, path: str, flags: int, mode: int) -> int:
        flags |= os.O_CLOEXEC
        try:
            fd = self._open(path, flags, mode)
        except OSError as err:
            code = err.errno or errno.EIO
            self.trace.append(_event(path, flags, mode, -code))
            if err.filename is None:
                raise OSError(code, os.strerror(code), path) from err
            raise
        self.trace.append(_event(path, flags, mode, 0))
        return fd

    def qemu_open(self, path: str, flags: int, mode: int = 0) -> int:
        """Open ``path`` like ``qemu_open_internal``; OSError(errno, ..., path) on failure."""
        try:
            return self._one(path, flags, mode)
        except OSError as err:
            if err.errno != errno.EINVAL or not flags & os.O_DIRECT:
                raise
            # QEMU's retry without O_DIRECT only chooses the error message.
            try:
                fd = self._one(path, flags & ~os.O_DIRECT, mode)
            except OSError:
                raise err from None
            os.close(fd)
            raise OSError(errno.EINVAL, "filesystem does not support O_DIRECT", path) from err

    def qemu_create(self, path: str, flags: int, mode: int) -> int:
        """``qemu_create``: the same with ``O_CREAT``."""
        return self.qemu_open(path, flags | os.O_CREAT, mode)

    def probe(self, path: str) -> None:
        """``cdrom_probe_device``'s open (``bdrv_find_protocol`` on a plain name).

        A file is never a CD-ROM, so the descriptor is closed at once; a
        failed probe only means "not a CD-ROM" and is not an error.
        """
        try:
            fd = self.qemu_open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return
        os.close(fd)


def _event(path: str, flags: int, mode: int, result: int) -> OpenEvent:
    return OpenEvent(
        path=path, flags=flags, mode=mode, result=result, flag_names=tuple(flag_names(flags))
    )
