"""A hypothesis-driven hostile peer against a real broker process.

Each example is a random mix of valid and hostile requests (path tricks,
flag soup, node types), sent whole or split at random points, with garbage
frames, descriptors sent to the broker, disconnects mid-frame and floods
without reading.  After every example: no descriptor handed out refers to
anything but a regular file beneath the grant, nothing outside the grant
(nor the FIFO, nor the device node) was opened or changed, the broker is
alive, a fresh peer is served, and the broker's descriptor count and RSS
are back to their baseline.

``TESTBED_ADVERSARY_EXAMPLES`` sets the number of examples per broker
(default 100: about ten seconds for both brokers).
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.transport import CMSG_SPACE, parse_rights, rights
from tests.broker.brokerproc import BrokerProc, need_root, wait_for
from tests.broker.fswatch import OpenWatch

EXAMPLES = int(os.environ.get("TESTBED_ADVERSARY_EXAMPLES", "100"))
HEADER = struct.Struct("=IIIIH")


def frame(path: bytes, flags: int, mode: int) -> bytes:
    return HEADER.pack(18 + len(path), 1, flags, mode, len(path)) + path


class World:
    """The tree the adversary plays in, and the broker serving it."""

    def __init__(self, root: Path, broker: BrokerProc) -> None:
        self.root = root
        self.grant = root / "grant"
        self.outside = root / "outside"
        self.broker = broker
        # Not directories: the test's own os.walk opens them.
        self.watch = OpenWatch(self.outside / "secret", self.grant / "fifo", self.grant / "null")
        self.outside_baseline = self.outside_state()
        self.fd_baseline = 0
        self.rss_baseline = 0

    def allowed_inodes(self) -> set[tuple[int, int]]:
        found = set()
        for dirpath, _dirs, files in os.walk(self.grant):
            for name in files:
                st_ = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(st_.st_mode) and st_.st_nlink == 1:
                    found.add((st_.st_dev, st_.st_ino))
        return found

    def outside_state(self) -> list[tuple[str, int, int]]:
        """Names, sizes and change times outside (read without opening the files)."""
        return sorted(
            (p.name, p.lstat().st_size, p.lstat().st_ctime_ns) for p in self.outside.iterdir()
        )


def build_tree(root: Path) -> None:
    grant, outside = root / "grant", root / "outside"
    for d in (grant, outside, grant / "sub"):
        d.mkdir()
        d.chmod(0o777)
    for p, data in ((grant / "a.img", b"a"), (grant / "sub" / "c.img", b"c")):
        p.write_bytes(data)
        p.chmod(0o666)
    (root / "probe.img").write_bytes(b"probe")
    (root / "probe.img").chmod(0o644)
    (outside / "secret").write_bytes(b"secret")
    (outside / "secret").chmod(0o666)
    os.mkfifo(grant / "fifo", 0o666)
    os.mknod(grant / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.link(outside / "secret", grant / "hard")
    (grant / "abs-in").symlink_to(grant / "a.img")
    (grant / "abs-out").symlink_to(outside / "secret")
    (grant / "rel-out").symlink_to("../outside/secret")
    (grant / "dir-out").symlink_to(outside)
    (grant / "proc").symlink_to("/proc/self/root" + str(outside / "secret"))
    (grant / "loop").symlink_to("loop")


@pytest.fixture(scope="module", params=["root", "nobody"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    need_root()
    import shutil
    import tempfile

    from tests.broker.brokerproc import BrokerProc

    root = Path(tempfile.mkdtemp(prefix="broker-adv-", dir="/tmp"))
    root.chmod(0o755)
    build_tree(root)
    grants = [
        {"path": str(root / "grant"), "access": "create", "symlinks": True},
        {"path": str(root / "probe.img"), "access": "ro"},
    ]
    broker = BrokerProc(root, grants, user=request.param, audit=False)
    w = World(root, broker)
    served(w)
    with broker.client() as c:  # the grant's root directory is held open from now on
        os.close(c.open(str(w.grant / "a.img"), os.O_RDONLY))
    w.fd_baseline = broker.fd_count()
    w.rss_baseline = broker.rss_kib()
    yield w
    broker.stop()
    w.watch.close()
    shutil.rmtree(root, ignore_errors=True)


def served(w: World) -> None:
    """A fresh peer gets the probe (a read-only file grant the adversary never names)."""
    with w.broker.client(timeout=10) as c:
        fd = c.open(str(w.root / "probe.img"), os.O_RDONLY)
        assert os.read(fd, 5) == b"probe"
        os.close(fd)


# -- the strategies ------------------------------------------------------------

NAMES = [
    "a.img",
    "sub/c.img",
    "abs-in",
    "",
    "/",
    ".",
    "..",
    "sub",
    "sub/",
    "sub/..",
    "a.img/",
    "a.img/.",
    "../outside/secret",
    "sub/../../outside/secret",
    "abs-out",
    "rel-out",
    "dir-out/secret",
    "proc",
    "loop",
    "hard",
    "fifo",
    "null",
    "new-file",
    "sub/new",
    "//a.img",
    "./a.img",
    "missing",
]
FLAGS = [
    os.O_RDONLY,
    os.O_RDWR,
    os.O_WRONLY | os.O_TRUNC,
    os.O_RDWR | os.O_CREAT,
    os.O_RDWR | os.O_CREAT | os.O_EXCL,
    os.O_RDONLY | os.O_DIRECTORY,
    os.O_RDONLY | os.O_NONBLOCK,
    os.O_RDONLY | os.O_NOFOLLOW,
    os.O_PATH,
    os.O_TMPFILE | os.O_RDWR,
    os.O_TMPFILE | os.O_RDONLY,
    os.O_ACCMODE,
    os.O_RDONLY | os.O_APPEND,
]


@st.composite
def paths(draw: Any) -> bytes:
    # Mostly beneath the grant, where the broker has decisions to make.
    base = draw(st.sampled_from(["GRANT/"] * 6 + ["GRANT", "/proc/self/root/GRANT/", "rel/"]))
    name = draw(st.sampled_from(NAMES))
    raw = (base + name).encode()
    if draw(st.integers(0, 9)) == 0:
        raw += draw(st.sampled_from([b"\xff", b"\0x", b"/" * 3, b"x" * 5000]))
    return raw


requests = st.tuples(
    paths(),
    st.one_of(*[st.sampled_from(FLAGS)] * 3, st.integers(0, 0xFFFFFFFF)),
    st.sampled_from([0, 0o644, 0o7777, 0xFFFFFFFF]),
)
actions = st.one_of(
    st.tuples(st.just("request"), requests, st.lists(st.integers(1, 40), max_size=4)),
    st.tuples(st.just("flood"), requests, st.integers(2, 300)),
    st.tuples(st.just("garbage"), st.binary(min_size=8, max_size=40), st.just(0)),
    st.tuples(st.just("half"), requests, st.integers(1, 17)),
    st.tuples(st.just("fd"), requests, st.just(0)),
)


# -- playing -------------------------------------------------------------------


class Peer:
    def __init__(self, w: World) -> None:
        self.w = w
        self.sock = w.broker.raw()
        self.sock.settimeout(10)
        self.allowed = w.allowed_inodes()

    def reply(self) -> int | None:
        """One reply (None if the broker hung up); check any fd that came with it."""
        try:
            data, anc, _flags, _ = self.sock.recvmsg(12, CMSG_SPACE)
        except ConnectionResetError:  # closed by the broker with our bytes unread
            return None
        fds = parse_rights(anc)
        try:
            if not data:
                assert not fds
                return None
            while len(data) < 12:
                more = self.sock.recv(12 - len(data))
                assert more, "the broker hung up mid-reply"
                data += more
            size, command, result = struct.unpack("=IIi", data)
            assert (size, command) == (12, 1) and result <= 0
            assert len(fds) == (1 if result == 0 else 0)
            for fd in fds:
                self.check(fd)
            return result
        finally:
            for fd in fds:
                os.close(fd)

    def check(self, fd: int) -> None:
        st_ = os.fstat(fd)
        assert stat.S_ISREG(st_.st_mode), f"handed out a non-regular fd {st_.st_mode:#o}"
        self.allowed |= self.w.allowed_inodes()  # files the adversary created
        assert (st_.st_dev, st_.st_ino) in self.allowed, "handed out a file outside the grant"
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE in (os.O_RDONLY, os.O_RDWR):
            assert os.pread(fd, 6, 0) != b"secret"

    def reconnect(self) -> None:
        self.sock.close()
        self.sock = self.w.broker.raw()
        self.sock.settimeout(10)

    def expect_hangup(self) -> None:
        ready, _, _ = select.select([self.sock], [], [], 10)
        assert ready, "the broker neither answered nor hung up"
        while (result := self.reply()) is not None:
            assert result <= 0
        self.reconnect()


def play(w: World, peer: Peer, action: tuple[Any, ...]) -> None:
    kind, payload, arg = action
    if kind == "garbage":
        peer.sock.sendall(payload)
        peer.sock.shutdown(socket.SHUT_WR)
        peer.expect_hangup()
        return
    raw, flags, mode = payload
    raw = raw.replace(b"GRANT", os.fsencode(str(w.grant)))
    data = frame(raw[:0xFFFF], flags, mode)
    if kind == "request":
        cuts = sorted({c % len(data) for c in arg} - {0})
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
            peer.sock.sendall(data[a:b])
        assert peer.reply() is not None, "the broker hung up on a well-framed request"
    elif kind == "flood":
        # Pipelined, read while sending: a peer that sends a burst larger than
        # the socket buffers and reads nothing until it is sent deadlocks
        # itself against any broker that bounds its memory.
        sender = threading.Thread(target=peer.sock.sendall, args=(data * arg,))
        sender.start()
        try:
            for _ in range(arg):
                assert peer.reply() is not None
        finally:
            sender.join(30)
    elif kind == "half":
        peer.sock.sendall(data[:arg])
        peer.sock.close()
        peer.sock = w.broker.raw()
        peer.sock.settimeout(10)
    elif kind == "fd":
        r, wfd = os.pipe()
        peer.sock.sendmsg([data], rights([r]))
        os.close(r)
        os.close(wfd)
        peer.expect_hangup()


def back_to_baseline(w: World) -> None:
    assert w.broker.alive(), w.broker.stderr()[-2000:]
    served(w)
    wait_for(
        lambda: w.broker.fd_count() <= w.fd_baseline,
        f"the broker's fd count back to {w.fd_baseline}",
        timeout=5,
    )
    assert w.broker.rss_kib() <= w.rss_baseline + 2048
    assert w.watch.opened() == [], "something outside the grant, a FIFO or a device was opened"
    assert w.outside_state() == w.outside_baseline


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(actions, min_size=1, max_size=12))
def test_hostile_peer_gets_nothing_outside_the_grant(world: World, script: list[Any]) -> None:
    peer = Peer(world)
    try:
        for action in script:
            play(world, peer, action)
    finally:
        peer.sock.close()
    time.sleep(0.01)
    back_to_baseline(world)
