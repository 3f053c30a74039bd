"""The -open-hook-fd wire protocol: a pure codec (no sockets) and flag names."""

from testbed.protocol.codec import (
    HEADER_SIZE,
    MAX_REQUEST_SIZE,
    NEED_DATA,
    PATH_MAX,
    QEMU_OPEN,
    REPLY_SIZE,
    REQUEST_FIXED_SIZE,
    FrameDecodeError,
    FrameError,
    InvalidRequest,
    OpenReply,
    OpenRequest,
    ReplyDecoder,
    RequestDecoder,
    encode_reply,
    encode_request,
)
from testbed.protocol.flags import flag_names, format_flags, parse_flags

__all__ = [
    "HEADER_SIZE",
    "MAX_REQUEST_SIZE",
    "NEED_DATA",
    "PATH_MAX",
    "QEMU_OPEN",
    "REPLY_SIZE",
    "REQUEST_FIXED_SIZE",
    "FrameDecodeError",
    "FrameError",
    "InvalidRequest",
    "OpenReply",
    "OpenRequest",
    "ReplyDecoder",
    "RequestDecoder",
    "encode_reply",
    "encode_request",
    "flag_names",
    "format_flags",
    "parse_flags",
]
