"""The codec, bytes in and events out, including every malformed frame."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.errors import LocalProtocolError, RemoteProtocolError
from testbed.protocol import (
    MAX_REQUEST_SIZE,
    NEED_DATA,
    FrameDecodeError,
    FrameError,
    InvalidRequest,
    OpenReply,
    OpenRequest,
    ReplyDecoder,
    RequestDecoder,
    encode_reply,
    encode_request,
    flag_names,
    format_flags,
    parse_flags,
)


def raw_request(
    path: bytes,
    flags: int = 0,
    mode: int = 0,
    *,
    size: int | None = None,
    name_len: int | None = None,
    command: int = 1,
) -> bytes:
    n = len(path) if name_len is None else name_len
    total = 18 + len(path) if size is None else size
    return struct.pack("=IIIIH", total, command, flags, mode, n) + path


def decode_all(data: bytes) -> list[object]:
    dec = RequestDecoder()
    dec.feed(data)
    events = []
    while (ev := dec.next_event()) is not NEED_DATA:
        events.append(ev)
    return events


def test_request_layout_is_byte_exact() -> None:
    frame = encode_request("/img/a.qcow2", 0o2, 0o644)
    assert len(frame) == 18 + len("/img/a.qcow2")
    size, cmd, flags, mode, n = struct.unpack_from("=IIIIH", frame)
    assert (size, cmd, flags, mode, n) == (len(frame), 1, 2, 0o644, 12)
    assert frame[18:] == b"/img/a.qcow2"  # no NUL terminator


def test_reply_layout_is_byte_exact() -> None:
    assert encode_reply(-errno.EACCES) == struct.pack("=IIi", 12, 1, -13)
    assert encode_reply(0) == struct.pack("=IIi", 12, 1, 0)


def test_request_round_trip() -> None:
    (ev,) = decode_all(encode_request(b"/x/\xff\xfe", 0o100002, 0o600))
    assert ev == OpenRequest(path=b"/x/\xff\xfe", flags=0o100002, mode=0o600)


def test_several_frames_in_one_buffer() -> None:
    data = encode_request("/a", 0) + encode_request("/b", 2) + encode_request("/c", 64, 0o644)
    assert [e.path for e in decode_all(data)] == [b"/a", b"/b", b"/c"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("cut", range(0, 22))
def test_short_buffer_needs_data(cut: int) -> None:
    frame = encode_request("/a/bc", 0)
    dec = RequestDecoder()
    dec.feed(frame[:cut])
    assert dec.next_event() is NEED_DATA
    dec.feed(frame[cut:])
    assert dec.next_event() == OpenRequest(path=b"/a/bc", flags=0, mode=0)
    assert dec.next_event() is NEED_DATA


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        (struct.pack("=II", 4, 1), FrameError.SIZE_TOO_SMALL),
        (struct.pack("=II", 12, 1) + b"\0" * 4, FrameError.SIZE_TOO_SMALL),
        (struct.pack("=II", 30, 7), FrameError.UNKNOWN_COMMAND),
        (raw_request(b"/abc", size=18 + 10), FrameError.SIZE_MISMATCH),
        (raw_request(b"/abc", name_len=40), FrameError.FILENAME_PAST_FRAME),
        (struct.pack("=II", 0xFFFFFFFF, 1), FrameError.SIZE_TOO_LARGE),
        (struct.pack("=II", MAX_REQUEST_SIZE + 1, 1), FrameError.SIZE_TOO_LARGE),
    ],
)
def test_malformed_frames(frame: bytes, kind: FrameError) -> None:
    dec = RequestDecoder()
    dec.feed(frame)
    with pytest.raises(FrameDecodeError) as info:
        dec.next_event()
    assert info.value.kind is kind
    assert isinstance(info.value, RemoteProtocolError)
    # the decoder stays broken: framing is lost
    with pytest.raises(FrameDecodeError):
        dec.next_event()


def test_huge_size_is_judged_from_the_header_alone() -> None:
    dec = RequestDecoder()
    dec.feed(struct.pack("=II", 4 * 1024**3 - 1, 1))
    with pytest.raises(FrameDecodeError):
        dec.next_event()
    assert dec.buffered == 8  # nothing was waited for or allocated


def test_embedded_nul_is_an_invalid_request_not_a_dead_connection() -> None:
    events = decode_all(raw_request(b"/a\0b") + encode_request("/ok", 0))
    assert events[0] == InvalidRequest(
        path=b"/a\0b", flags=0, mode=0, errno=errno.EINVAL, reason="filename contains a NUL byte"
    )
    assert events[1] == OpenRequest(path=b"/ok", flags=0, mode=0)


def test_name_longer_than_path_max_is_enametoolong() -> None:
    (ev,) = decode_all(raw_request(b"/" + b"a" * 4096))
    assert isinstance(ev, InvalidRequest) and ev.errno == errno.ENAMETOOLONG
    (ok,) = decode_all(raw_request(b"/" + b"a" * 4095))
    assert isinstance(ok, OpenRequest)


@given(st.integers(4097, 0xFFFF), st.lists(st.integers(1, 9000), min_size=1, max_size=30))
def test_an_over_long_name_is_discarded_as_it_arrives(size: int, chunks: list[int]) -> None:
    """The decoder never holds more of a frame than a valid request can be."""
    data = raw_request(b"/" + b"n" * (size - 1)) + encode_request("/next", 0)
    decoder = RequestDecoder()
    events = []
    offset = 0
    cuts = iter(chunks * (len(data) // len(chunks) + 1))
    while offset < len(data):
        step = next(cuts)
        decoder.feed(data[offset : offset + step])
        offset += step
        assert decoder.buffered <= 18 + 4096 + step
        while (ev := decoder.next_event()) is not NEED_DATA:
            events.append(ev)
    assert [type(e) for e in events] == [InvalidRequest, OpenRequest]
    assert events[0].errno == errno.ENAMETOOLONG and events[0].path == b"/" + b"n" * 63
    assert events[1].path == b"/next" and not decoder.mid_frame


@pytest.mark.parametrize(
    ("path", "message"),
    [(b"/a\0b", "NUL"), (b"/" + b"x" * 4096, "PATH_MAX"), (b"", "empty")],
)
def test_encoder_refuses_what_the_protocol_cannot_carry(path: bytes, message: str) -> None:
    with pytest.raises(LocalProtocolError, match=message):
        encode_request(path, 0)


def test_encoder_refuses_out_of_range_integers() -> None:
    with pytest.raises(LocalProtocolError):
        encode_request("/a", 1 << 32)
    with pytest.raises(LocalProtocolError):
        encode_reply(1)


def test_reply_decoder_attaches_the_fd() -> None:
    dec = ReplyDecoder()
    dec.feed(encode_reply(0)[:5], [7])
    assert dec.next_event() is NEED_DATA
    dec.feed(encode_reply(0)[5:])
    assert dec.next_event() == OpenReply(result=0, fd=7)
    dec.feed(encode_reply(-2))
    assert dec.next_event() == OpenReply(result=-2)


@pytest.mark.parametrize(
    ("data", "fds", "kind"),
    [
        (encode_reply(0), [], FrameError.NO_FD),
        (encode_reply(0), [5, 6], FrameError.TOO_MANY_FDS),
        (encode_reply(-13), [5], FrameError.FD_WITHOUT_SUCCESS),
        (struct.pack("=IIi", 12, 1, 3), [], FrameError.BAD_RESULT),
        (struct.pack("=IIi", 16, 1, 0), [], FrameError.SIZE_MISMATCH),
        (struct.pack("=IIi", 12, 2, 0), [], FrameError.UNKNOWN_COMMAND),
        (b"", [9], FrameError.FD_WITHOUT_REPLY),
    ],
)
def test_bad_replies_hand_back_every_fd(data: bytes, fds: list[int], kind: FrameError) -> None:
    dec = ReplyDecoder()
    dec.feed(data, fds)
    with pytest.raises(FrameDecodeError) as info:
        dec.next_event()
    assert info.value.kind is kind
    assert sorted(dec.take_fds()) == sorted(fds)


def test_flag_names() -> None:
    assert flag_names(0o2 | 0o100 | 0o2000000) == ["O_RDWR", "O_CREAT", "O_CLOEXEC"]
    assert format_flags(0o4000) == "O_RDONLY|O_NONBLOCK"
    assert parse_flags("O_RDWR|O_CREAT|O_CLOEXEC") == 0o2 | 0o100 | 0o2000000
    assert parse_flags(format_flags(0o40000 | 0o1)) == 0o40000 | 0o1  # O_DIRECT|O_WRONLY
    with pytest.raises(ValueError, match="O_BOGUS"):
        parse_flags("O_RDONLY|O_BOGUS")


@given(st.integers(0, 0xFFFFFFFF))
def test_flag_names_lose_no_bit(flags: int) -> None:
    assert parse_flags(format_flags(flags)) == flags


paths = st.binary(min_size=1, max_size=300).filter(lambda b: b"\0" not in b)
requests = st.tuples(paths, st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))


@given(st.lists(requests, min_size=1, max_size=8), st.data())
def test_any_split_gives_the_same_requests(
    reqs: list[tuple[bytes, int, int]], data: st.DataObject
) -> None:
    stream = b"".join(encode_request(p, f, m) for p, f, m in reqs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    dec = RequestDecoder()
    got = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        dec.feed(stream[prev:cut])
        prev = cut
        while (ev := dec.next_event()) is not NEED_DATA:
            got.append(ev)
    assert got == [OpenRequest(path=p, flags=f, mode=m) for p, f, m in reqs]


@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_request_decoder(blob: bytes) -> None:
    dec = RequestDecoder()
    dec.feed(blob)
    try:
        while dec.next_event() is not NEED_DATA:
            pass
    except RemoteProtocolError:
        pass


@given(st.binary(max_size=40), st.lists(st.integers(3, 1000), max_size=3))
def test_random_bytes_never_crash_the_reply_decoder(blob: bytes, fds: list[int]) -> None:
    dec = ReplyDecoder()
    dec.feed(blob, fds)
    taken: list[int] = []
    try:
        while (ev := dec.next_event()) is not NEED_DATA:
            assert isinstance(ev, OpenReply)
            if ev.fd is not None:
                taken.append(ev.fd)
    except RemoteProtocolError:
        pass
    assert sorted(taken + dec.take_fds()) == sorted(fds)
