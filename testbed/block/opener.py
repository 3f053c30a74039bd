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

Through the broker, a relative name is sent joined to the working directory
(:func:`hook_name`), as the series' ``open_hook_absolute_name()`` does: the
broker cannot know QEMU's working directory.  Errors keep the name as given,
like QEMU's messages.

A broker that dies (extension patch 0007) fails the hook as the patch's
``qemu_open_hook`` does: the request that finds the peer gone fails with
the transport's errno (``EPIPE`` when the send fails, ``ECONNRESET`` when
the broker closed the socket before replying, ``EPROTO`` for a malformed
reply), the hook stays failed, and every later open fails at once with
``ENOTCONN`` until :meth:`Opener.set_hook` attaches a new broker
(``open-hook-set``).  Those failed requests reach no broker, so they are
not in :attr:`Opener.trace`.  :meth:`Opener.hook_stats` is
``query-open-hook``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from testbed.errors import BlockError, BlockUsageError, ProtocolError, TransportError, WaitTimeout
from testbed.protocol import flag_names

#: ``open``-like: (path, flags, mode) -> fd, or OSError.
RawOpen = Callable[[str, int, int], int]


class HookLike(Protocol):
    """What the opener needs of :class:`testbed.transport.HookClient`."""

    def open(self, path: str, flags: int, mode: int = 0) -> int: ...


def _hook_errno(err: Exception) -> tuple[int, str]:
    """(errno, the patch's stage words) for a request the hook failed."""
    if isinstance(err, ProtocolError):
        return errno.EPROTO, "malformed reply for"
    if isinstance(err, WaitTimeout):
        # the patch waits for ever; the model's client has a timeout
        return errno.ETIMEDOUT, "receiving the reply for"
    cause = err.__cause__
    if isinstance(cause, OSError) and cause.errno:
        # HookClient words a failed send "sending QEMU_OPEN ...", a failed receive otherwise
        sending = str(err).startswith("sending")
        return cause.errno, "sending the request for" if sending else "receiving the reply for"
    return errno.ECONNRESET, "the broker closed the socket before replying for"


@dataclass(frozen=True, kw_only=True)
class OpenEvent:
    """One open request, as the broker sees it."""

    path: str
    flags: int
    mode: int
    #: 0 when a descriptor came back, else the negated errno.
    result: int
    flag_names: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, object]:
        """The event as a JSON object (``testbed model open --json``'s trace entries)."""
        return {
            "path": self.path,
            "flags": self.flags,
            "flag_names": list(self.flag_names),
            "mode": self.mode,
            "result": self.result,
        }


def hook_name(path: str, cwd: str | None = None) -> str:
    """The name the hook sends for ``path``: relative names joined to ``cwd`` (default: ours).

    Not normalised (``../x`` becomes ``CWD/../x``), and an empty name stays
    empty (joined it would name the directory itself; open(2) says ENOENT).
    ``os.getcwd()`` raises FileNotFoundError once the directory is removed,
    as the patch's getcwd() fails: no request is sent then.
    """
    if not path or path.startswith("/"):
        return path
    base = os.getcwd() if cwd is None else cwd
    return base + path if base.endswith("/") else f"{base}/{path}"


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
        self._hook = hook
        self.trace: list[OpenEvent] = []
        #: query-open-hook's figures (all brokers together).
        self.hook_broken = False
        self.hook_requests = 0
        self.hook_failures = 0
        self.hook_reattached = 0
        self.hook_last_error = ""

    def set_hook(self, hook: HookLike) -> None:
        """``open-hook-set``: ``hook`` serves the next open; the old one is closed, the
        failed state cleared (``last-error`` is kept, as in the patch)."""
        if not self.via_broker:
            raise BlockError("open-hook-set: QEMU was not started with -open-hook-fd")
        old = self._hook
        self._hook = hook
        self._open = hook.open
        self.hook_broken = False
        self.hook_reattached += 1
        close = getattr(old, "close", None)
        if callable(close) and old is not hook:
            close()

    def hook_stats(self) -> dict[str, object]:
        """``query-open-hook``'s answer."""
        if not self.via_broker:
            return {"state": "none"}
        out: dict[str, object] = {
            "state": "broken" if self.hook_broken else "connected",
            "requests": self.hook_requests,
            "failures": self.hook_failures,
            "reattached": self.hook_reattached,
        }
        if self.hook_last_error:
            out["last-error"] = self.hook_last_error
        return out

    def _hook_open(self, sent: str, flags: int, mode: int) -> int:
        """One request to the broker, failing the hook as the patch does."""
        if self.hook_broken:
            self.hook_failures += 1
            raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN), sent)
        try:
            fd = self._open(sent, flags, mode)
        except OSError:
            self.hook_requests += 1  # the broker answered with an errno
            raise
        except (TransportError, ProtocolError, WaitTimeout) as err:
            code, stage = _hook_errno(err)
            self.hook_failures += 1
            self.hook_broken = True
            self.hook_last_error = f"{stage} '{sent}': {os.strerror(code)}"
            raise OSError(code, os.strerror(code), sent) from err
        self.hook_requests += 1
        return fd

    def _one(self, path: str, flags: int, mode: int) -> int:
        flags |= os.O_CLOEXEC
        try:
            sent = hook_name(path) if self.via_broker else path
        except OSError as err:  # no working directory: no request, as in the patch
            code = err.errno or errno.ENOENT
            raise OSError(code, os.strerror(code), path) from err
        try:
            fd = (
                self._hook_open(sent, flags, mode)
                if self.via_broker
                else self._open(sent, flags, mode)
            )
        except OSError as err:
            code = err.errno or errno.EIO
            if self.hook_broken:  # no broker saw it: not in the trace
                raise OSError(code, os.strerror(code), path) from err
            self.trace.append(_event(sent, flags, mode, -code))
            # QEMU's message names the file as it was given, not as it was sent
            raise OSError(code, os.strerror(code), path) from err
        self.trace.append(_event(sent, flags, mode, 0))
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
