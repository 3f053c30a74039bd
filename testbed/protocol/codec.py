"""The -open-hook-fd wire protocol, sans I/O.

From the RFC's qemu-options.hx text (all integers in host byte order)::

    message:  u32 message_size   whole message, header included
              u32 command
              u8  payload[message_size - 8]

    QEMU_OPEN request (command 1), 18 + filename_len bytes:
              u32 message_size; u32 command = 1; u32 flags; u32 mode;
              u16 filename_len; u8 filename[filename_len]

    QEMU_OPEN reply, 12 bytes:
              u32 message_size = 12; u32 command = 1; s32 result
              result < 0: a negated errno; result == 0: one file descriptor
              travels as SCM_RIGHTS on the same sendmsg.

Points the RFC left open, decided by this project: the filename is not
NUL-terminated and ``filename_len`` counts no NUL; an embedded NUL is
answered ``-EINVAL`` and a name over ``PATH_MAX`` (4096) ``-ENAMETOOLONG``,
both without closing the connection, because the frame itself is sound.  A
frame whose framing is broken (sizes that disagree, an unknown command, a
size no request can have) is the peer's fault and ends the connection.

Decoders are fed bytes (and, on the client side, the descriptors that came
with them) and hand out events; a short buffer yields :data:`NEED_DATA`,
never a half-parsed value.  Descriptors are plain ints here: the codec never
touches a socket and never closes anything.
"""

from __future__ import annotations

import enum
import errno
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, NoReturn, TypeVar

from testbed.errors import FrameDecodeError as FrameDecodeError  # re-exported
from testbed.errors import LocalProtocolError

QEMU_OPEN = 1
PATH_MAX = 4096

HEADER = struct.Struct("=II")
REQUEST_FIXED = struct.Struct("=IIIIH")
REPLY = struct.Struct("=IIi")

HEADER_SIZE = HEADER.size  # 8
REQUEST_FIXED_SIZE = REQUEST_FIXED.size  # 18
REPLY_SIZE = REPLY.size  # 12
#: filename_len is a u16, so no well-formed request is larger than this.
MAX_REQUEST_SIZE = REQUEST_FIXED_SIZE + 0xFFFF

U32_MAX = 0xFFFFFFFF
#: Bytes of an over-long name kept for the answer (and the audit log).
_SHOWN_NAME = 64
MAX_ERRNO = 4095


EventT = TypeVar("EventT")


class Sentinel(enum.Enum):
    NEED_DATA = "need more data"


#: What ``next_event`` returns until a whole frame is buffered.
NEED_DATA = Sentinel.NEED_DATA


class FrameError(enum.Enum):
    """Why a frame is malformed; carried by :class:`RemoteProtocolError`."""

    SIZE_TOO_SMALL = "message_size smaller than the header"
    SIZE_TOO_LARGE = "message_size larger than any request can be"
    SIZE_MISMATCH = "message_size does not match the payload"
    UNKNOWN_COMMAND = "unknown command"
    FILENAME_PAST_FRAME = "filename_len runs past the end of the frame"
    BAD_RESULT = "reply result is positive"
    FD_WITHOUT_SUCCESS = "a descriptor came with a failure reply"
    NO_FD = "success reply without a descriptor"
    TOO_MANY_FDS = "more than one descriptor with a reply"
    FD_WITHOUT_REPLY = "a descriptor arrived with no reply"
    UNEXPECTED_FD = "the client sent a descriptor"


@dataclass(frozen=True, kw_only=True)
class OpenRequest:
    """A ``QEMU_OPEN`` request: what QEMU would have passed to ``open(2)``."""

    path: bytes
    flags: int
    mode: int

    def __post_init__(self) -> None:
        if not 0 <= self.flags <= U32_MAX:
            raise LocalProtocolError(f"flags {self.flags:#x} do not fit in a u32")
        if not 0 <= self.mode <= U32_MAX:
            raise LocalProtocolError(f"mode {self.mode:#o} does not fit in a u32")
        if len(self.path) > 0xFFFF:
            raise LocalProtocolError(f"filename of {len(self.path)} bytes does not fit a u16")

    @property
    def path_str(self) -> str:
        """The path as text; undecodable bytes kept as surrogates."""
        return self.path.decode("utf-8", "surrogateescape")


@dataclass(frozen=True, kw_only=True)
class InvalidRequest:
    """A well-framed request whose filename cannot be opened as given.

    The broker answers it with ``-errno`` and keeps the connection.
    """

    path: bytes
    flags: int
    mode: int
    errno: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class OpenReply:
    """A ``QEMU_OPEN`` reply: ``fd`` is set exactly when ``result == 0``."""

    result: int
    fd: int | None = None

    def __post_init__(self) -> None:
        if self.result > 0 or self.result < -MAX_ERRNO:
            raise LocalProtocolError(f"result {self.result} is neither 0 nor a negated errno")
        if (self.result == 0) != (self.fd is not None):
            raise LocalProtocolError("a reply carries an fd if and only if result == 0")


def _path_bytes(path: str | bytes) -> bytes:
    return path if isinstance(path, bytes) else path.encode("utf-8", "surrogateescape")


def encode_request(path: str | bytes, flags: int, mode: int = 0) -> bytes:
    """The bytes of a ``QEMU_OPEN`` request.

    Raises :class:`LocalProtocolError` for what the protocol cannot carry or
    the broker would refuse anyway (NUL in the name, name over PATH_MAX).
    """
    raw = _path_bytes(path)
    if b"\0" in raw:
        raise LocalProtocolError(f"filename {raw!r} contains a NUL byte")
    if len(raw) > PATH_MAX:
        raise LocalProtocolError(f"filename of {len(raw)} bytes is longer than PATH_MAX")
    if not raw:
        raise LocalProtocolError("empty filename")
    req = OpenRequest(path=raw, flags=flags, mode=mode)
    return (
        REQUEST_FIXED.pack(REQUEST_FIXED_SIZE + len(raw), QEMU_OPEN, req.flags, req.mode, len(raw))
        + raw
    )


def encode_reply(result: int) -> bytes:
    """The 12 bytes of a reply; the caller attaches the fd when ``result == 0``."""
    if result > 0 or result < -MAX_ERRNO:
        raise LocalProtocolError(f"result {result} is neither 0 nor a negated errno")
    return REPLY.pack(REPLY_SIZE, QEMU_OPEN, result)


class _Decoder(Generic[EventT]):
    """Incremental decoding that stays broken once the framing is lost.

    Subclasses implement ``_next``: the next event, or :data:`NEED_DATA`.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: FrameDecodeError | None = None

    def next_event(self) -> EventT | Sentinel:
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except FrameDecodeError as err:
            self._error = err
            raise

    def _next(self) -> EventT | Sentinel:
        raise NotImplementedError


class RequestDecoder(_Decoder[OpenRequest | InvalidRequest]):
    """The broker's side: bytes in, :class:`OpenRequest`/:class:`InvalidRequest` out.

    After a :class:`FrameDecodeError` the stream has lost its framing; the
    decoder stays broken and the connection must be closed.

    Memory is bounded whatever the peer sends: a frame is buffered whole
    only if it can be a valid request (at most ``REQUEST_FIXED_SIZE +
    PATH_MAX`` bytes); the name of a longer one is answered
    ``-ENAMETOOLONG`` from its first 64 bytes and the rest is discarded as
    it arrives, never stored.
    """

    def __init__(self) -> None:
        super().__init__()
        self._skip = 0  # bytes of an over-long name still to discard
        self._pending: InvalidRequest | None = None  # its answer, once discarded

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed as a whole frame."""
        return len(self._buf)

    @property
    def mid_frame(self) -> bool:
        """Whether part of a frame has arrived and the rest has not."""
        return bool(self._buf) or self._pending is not None

    def feed(self, data: bytes) -> None:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        self._buf += data

    def _next(self) -> OpenRequest | InvalidRequest | Sentinel:
        if self._pending is not None:
            if self._skip:
                return NEED_DATA
            pending, self._pending = self._pending, None
            return pending
        buf = self._buf
        have = len(buf)
        if have < HEADER_SIZE:
            return NEED_DATA
        size, command = HEADER.unpack_from(buf)
        # Framing is judged from the header alone, before waiting for (or
        # buffering) the payload, so a bogus 4 GiB size costs nothing.
        if size < REQUEST_FIXED_SIZE or size > MAX_REQUEST_SIZE or command != QEMU_OPEN:
            self._bad_header(size, command)
        if have < REQUEST_FIXED_SIZE:
            return NEED_DATA
        _, _, flags, mode, name_len = REQUEST_FIXED.unpack_from(buf)
        if name_len != size - REQUEST_FIXED_SIZE:
            self._bad_name_len(size, name_len)
        if name_len > PATH_MAX:
            return self._too_long(size, flags, mode, name_len)
        if have < size:
            return NEED_DATA
        path = bytes(buf[REQUEST_FIXED_SIZE:size])
        del buf[:size]
        if b"\0" in path:
            return InvalidRequest(
                path=path,
                flags=flags,
                mode=mode,
                errno=errno.EINVAL,
                reason="filename contains a NUL byte",
            )
        if not path:
            return InvalidRequest(
                path=path, flags=flags, mode=mode, errno=errno.ENOENT, reason="empty filename"
            )
        return OpenRequest(path=path, flags=flags, mode=mode)

    def _too_long(
        self, size: int, flags: int, mode: int, name_len: int
    ) -> InvalidRequest | Sentinel:
        """Answer an over-long name from its start; discard the rest unbuffered."""
        kept = REQUEST_FIXED_SIZE + _SHOWN_NAME
        buf = self._buf
        if len(buf) < kept:
            return NEED_DATA
        event = InvalidRequest(
            path=bytes(buf[REQUEST_FIXED_SIZE:kept]),
            flags=flags,
            mode=mode,
            errno=errno.ENAMETOOLONG,
            reason=f"filename of {name_len} bytes is longer than PATH_MAX",
        )
        taken = min(len(buf), size)
        del buf[:taken]
        self._skip = size - taken
        if self._skip:
            self._pending = event
            return NEED_DATA
        return event

    def _bad_header(self, size: int, command: int) -> NoReturn:
        head = bytes(self._buf[:HEADER_SIZE])
        if size < HEADER_SIZE:
            raise FrameDecodeError(FrameError.SIZE_TOO_SMALL, f"message_size {size}", frame=head)
        if command != QEMU_OPEN:
            raise FrameDecodeError(FrameError.UNKNOWN_COMMAND, f"command {command}", frame=head)
        if size < REQUEST_FIXED_SIZE:
            raise FrameDecodeError(
                FrameError.SIZE_TOO_SMALL,
                f"message_size {size} < {REQUEST_FIXED_SIZE} for QEMU_OPEN",
                frame=head,
            )
        raise FrameDecodeError(
            FrameError.SIZE_TOO_LARGE, f"message_size {size} > {MAX_REQUEST_SIZE}", frame=head
        )

    def _bad_name_len(self, size: int, name_len: int) -> NoReturn:
        fixed = bytes(self._buf[:REQUEST_FIXED_SIZE])
        if name_len > size - REQUEST_FIXED_SIZE:
            raise FrameDecodeError(
                FrameError.FILENAME_PAST_FRAME,
                f"filename_len {name_len} but only {size - REQUEST_FIXED_SIZE} payload bytes",
                frame=fixed,
            )
        raise FrameDecodeError(
            FrameError.SIZE_MISMATCH,
            f"message_size {size} but 18 + filename_len is {REQUEST_FIXED_SIZE + name_len}",
            frame=fixed,
        )


class ReplyDecoder(_Decoder[OpenReply]):
    """QEMU's side: bytes and received fds in, :class:`OpenReply` out.

    Descriptors are attached to the reply whose bytes they arrived with.
    On a protocol error the decoder hands back every descriptor it holds via
    :meth:`take_fds` so the caller can close them; it never closes anything.
    """

    def __init__(self) -> None:
        super().__init__()
        self._fds: list[int] = []

    def feed(self, data: bytes, fds: Iterable[int] = ()) -> None:
        self._buf += data
        self._fds.extend(fds)

    def take_fds(self) -> list[int]:
        """Every descriptor fed and not yet handed out in a reply."""
        fds, self._fds = self._fds, []
        return fds

    def _next(self) -> OpenReply | Sentinel:
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            if self._fds and not buf:
                raise FrameDecodeError(FrameError.FD_WITHOUT_REPLY, f"{len(self._fds)} fd(s)")
            return NEED_DATA
        size, command = HEADER.unpack_from(buf)
        head = bytes(buf[:HEADER_SIZE])
        if command != QEMU_OPEN:
            raise FrameDecodeError(FrameError.UNKNOWN_COMMAND, f"command {command}", frame=head)
        if size != REPLY_SIZE:
            kind = FrameError.SIZE_TOO_SMALL if size < REPLY_SIZE else FrameError.SIZE_MISMATCH
            raise FrameDecodeError(kind, f"reply message_size {size}, expected 12", frame=head)
        if len(buf) < REPLY_SIZE:
            return NEED_DATA
        _, _, result = REPLY.unpack_from(buf)
        frame = bytes(buf[:REPLY_SIZE])
        if result > 0 or result < -MAX_ERRNO:
            raise FrameDecodeError(FrameError.BAD_RESULT, f"result {result}", frame=frame)
        fds = self._fds
        if result < 0 and fds:
            raise FrameDecodeError(
                FrameError.FD_WITHOUT_SUCCESS, f"result {result} with {len(fds)} fd(s)", frame=frame
            )
        if result == 0 and not fds:
            raise FrameDecodeError(FrameError.NO_FD, "result 0", frame=frame)
        if len(fds) > 1:
            raise FrameDecodeError(FrameError.TOO_MANY_FDS, f"{len(fds)} fds", frame=frame)
        del buf[:REPLY_SIZE]
        fd = fds.pop() if result == 0 else None
        return OpenReply(result=result, fd=fd)
