"""The broker's fast path (remembered decisions) answers exactly what the general path does.

Two in-process brokers serve the same tree: one as shipped, one whose gate
never remembers a decision, so that every request goes the general way.
Each request is sent twice to each (the second time the first broker
answers from its remembered decision) and the answers compared: the errno,
or the descriptor's inode and status flags.  The tests that follow would
fail on a broker that remembered too much: a decision reused for another
flag, mode or name byte, a refusal remembered, a stale inode served after
the tree changed, or a cache that grows with what a peer sends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import socket
import struct
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.broker import Broker, Gate, Policy
from testbed.broker.gate import FAST_ENTRIES, FAST_NAME_MAX
from testbed.broker.policy import Access, Grant
from testbed.protocol import OpenRequest
from testbed.transport import CMSG_SPACE, parse_rights
from tests.broker.fswatch import OpenWatch

HEADER = struct.Struct("=IIIIH")
REPLY = struct.Struct("=IIi")
EXAMPLES = int(os.environ.get("TESTBED_FASTPATH_EXAMPLES", "150"))

#: An answer as a peer sees it: ("errno", code) or ("fd", (dev, ino), F_GETFL).
Answer = tuple[Any, ...]


def frame(path: bytes, flags: int, mode: int = 0) -> bytes:
    return HEADER.pack(18 + len(path), 1, flags, mode, len(path)) + path


class Peer:
    """A raw client: one frame out, one reply (and its fd) back, as an :data:`Answer`."""

    def __init__(self, broker: Broker) -> None:
        ours, self.sock = socket.socketpair()
        self.sock.settimeout(10)
        broker.add_connection(ours)

    def ask(self, data: bytes) -> Answer:
        self.sock.sendall(data)
        reply, anc, _flags, _ = self.sock.recvmsg(REPLY.size, CMSG_SPACE)
        fds = parse_rights(anc)
        _size, _cmd, result = REPLY.unpack(reply)
        if result < 0:
            assert not fds
            return ("errno", -result)
        (fd,) = fds
        try:
            st_ = os.fstat(fd)
            return ("fd", (st_.st_dev, st_.st_ino), fcntl.fcntl(fd, fcntl.F_GETFL))
        finally:
            os.close(fd)

    def close(self) -> None:
        self.sock.close()


class Pair:
    """The shipped broker and one that always goes the general way, same policy."""

    def __init__(self, policy: Policy, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> None:
        self.fast = Broker(policy, **kw.get("fast", {}))
        self.general = Broker(policy, **kw.get("general", {}))
        monkeypatch.setattr(self.general.gate, "remember", lambda request, outcome: None)
        self.replayed = 0
        replay = self.fast.gate.open_decided

        def counted(decision: Any) -> int:
            fd = replay(decision)
            self.replayed += fd >= 0
            return fd

        monkeypatch.setattr(self.fast.gate, "open_decided", counted)
        self.fast.start()
        self.general.start()
        self.fast_peer = Peer(self.fast)
        self.general_peer = Peer(self.general)

    def both(self, data: bytes) -> tuple[Answer, Answer]:
        return self.fast_peer.ask(data), self.general_peer.ask(data)

    def same_twice(self, data: bytes) -> Answer:
        """Ask both brokers twice; every answer must be the general path's."""
        first, reference = self.both(data)
        again, reference_again = self.both(data)
        assert first == reference, data
        assert again == reference_again, data
        return again

    def close(self) -> None:
        self.fast_peer.close()
        self.general_peer.close()
        self.fast.stop()
        self.general.stop()


def build_tree(root: Path) -> Policy:
    ro, rw, sym, outside = root / "ro", root / "rw", root / "sym", root / "outside"
    dev, hl, dirs = root / "dev", root / "hl", root / "dirs"
    for d in (ro, ro / "sub", rw, sym, outside, dev, hl, dirs, dirs / "sub"):
        d.mkdir()
    for f in (ro / "a.img", ro / "b.img", ro / "sub" / "c.img", rw / "d.img", sym / "e.img",
              dev / "g.img", hl / "h.img", dirs / "f.img"):  # fmt: skip
        f.write_bytes(b"x" * 4096)
    os.mkfifo(dev / "fifo")
    os.link(hl / "h.img", hl / "h2.img")
    (outside / "secret").write_bytes(b"secret")
    (root / "one.img").write_bytes(b"one")
    (ro / "hard1").write_bytes(b"h")
    os.link(ro / "hard1", ro / "hard2")
    os.mkfifo(ro / "fifo")
    (ro / "lnk").symlink_to("a.img")
    (ro / "out").symlink_to("../outside/secret")
    (sym / "rel").symlink_to("e.img")
    (sym / "abs").symlink_to(ro / "a.img")
    (sym / "esc").symlink_to("../outside/secret")
    return Policy(
        grants=(
            Grant(path=str(ro), access=Access.RO),
            Grant(path=str(rw), access=Access.RW),
            Grant(path=str(sym), access=Access.RO, symlinks=True),
            Grant(path=str(root / "one.img"), access=Access.RO),
            Grant(path=str(dev), access=Access.RO, devices=True),
            Grant(path=str(hl), access=Access.RW, hardlinks=True),
            Grant(path=str(dirs), access=Access.RO, directories=True),
        )
    )


NAMES = (
    "ro/a.img", "ro/b.img", "ro/sub/c.img", "ro/sub/../a.img", "ro//a.img", "ro/./a.img",
    "ro/a.img/", "ro/hard1", "ro/fifo", "ro/lnk", "ro/out", "ro/sub", "ro", "ro/", "ro/nope",
    "rw/d.img", "rw/../ro/a.img", "sym/e.img", "sym/rel", "sym/abs", "sym/esc",
    "one.img", "outside/secret", "ro/../outside/secret",
    "dev/g.img", "dev/fifo", "hl/h.img", "hl/h2.img", "dirs/f.img", "dirs/sub", "dirs",
)  # fmt: skip
#: The names a granted open of is answered from its decision the next time:
#: regular files of directory grants without devices or hardlinks, reached
#: without a hand walk.
REPLAYABLE = {
    "ro/a.img", "ro/b.img", "ro/sub/c.img", "ro/sub/../a.img", "ro//a.img", "ro/./a.img",
    "rw/d.img", "sym/e.img", "sym/rel", "dirs/f.img",
}  # fmt: skip
FLAG_BITS = (
    os.O_WRONLY, os.O_RDWR, os.O_APPEND, os.O_NONBLOCK, os.O_DIRECTORY, os.O_NOFOLLOW,
    os.O_CLOEXEC, os.O_NOATIME, os.O_DSYNC, os.O_SYNC, os.O_TRUNC, os.O_CREAT, os.O_EXCL,
    os.O_PATH, os.O_TMPFILE, os.O_NOCTTY, 0o100000, 1 << 30, 1 << 31,
)  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Policy]]:
    root = tmp_path_factory.mktemp("fastpath")
    yield root, build_tree(root)


@pytest.fixture
def pair(world: tuple[Path, Policy], monkeypatch: pytest.MonkeyPatch) -> Iterator[Pair]:
    p = Pair(world[1], monkeypatch)
    yield p
    p.close()


@st.composite
def requests(draw: st.DrawFn, root: bytes) -> bytes:
    """A request frame: a name of the tree (maybe with one byte changed), flags, mode."""
    path = root + b"/" + os.fsencode(draw(st.sampled_from(NAMES)))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(path) - 1))
        byte = draw(st.sampled_from(b"/.\x00\xffaz1"))
        path = path[:at] + bytes([byte]) + path[at + 1 :]
    flags = 0
    for bit in draw(st.lists(st.sampled_from(FLAG_BITS), max_size=4)):
        flags |= bit
    mode = draw(st.sampled_from((0, 0o644, 0o4777)))
    return frame(path, flags, mode)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_fast_and_general_paths_answer_alike(
    world: tuple[Path, Policy], pair: Pair, data: st.DataObject
) -> None:
    root = os.fsencode(str(world[0]))
    for _ in range(data.draw(st.integers(1, 6))):
        pair.same_twice(data.draw(requests(root)))


def test_the_corpus_goes_through_the_fast_path(world: tuple[Path, Policy], pair: Pair) -> None:
    """Every name and flag set, both paths; and the fast path did serve the granted ones."""
    root = os.fsencode(str(world[0]))
    granted = 0
    for name in NAMES:
        for flags in (0, os.O_RDWR, os.O_NONBLOCK | os.O_CLOEXEC, os.O_DIRECTORY, os.O_NOFOLLOW):
            before = pair.replayed
            answer = pair.same_twice(frame(root + b"/" + os.fsencode(name), flags))
            granted += answer[0] == "fd"
            # Answered from its decision the second time, and only then, exactly
            # when it was granted and is a replayable name.
            expected = answer[0] == "fd" and name in REPLAYABLE
            assert pair.replayed - before == expected, (name, flags)
    assert granted >= 30
    assert not pair.general.gate.decisions


def test_a_decision_does_not_answer_other_flags(world: tuple[Path, Policy], pair: Pair) -> None:
    a = os.fsencode(str(world[0] / "ro" / "a.img"))
    assert pair.same_twice(frame(a, os.O_RDONLY))[0] == "fd"
    assert pair.replayed == 1
    # O_RDWR on a read-only grant: refused, however often O_RDONLY was answered.
    assert pair.same_twice(frame(a, os.O_RDWR)) == ("errno", 13)
    assert pair.same_twice(frame(a, os.O_RDONLY | os.O_TRUNC)) == ("errno", 13)
    assert pair.same_twice(frame(a, os.O_RDONLY | os.O_PATH)) == ("errno", 13)
    # A status flag asked for is the one the descriptor has.
    got = pair.same_twice(frame(a, os.O_RDONLY | os.O_NONBLOCK))
    assert got[0] == "fd" and got[2] & os.O_NONBLOCK
    assert not pair.same_twice(frame(a, os.O_RDONLY))[2] & os.O_NONBLOCK


def test_a_decision_does_not_answer_another_name(world: tuple[Path, Policy], pair: Pair) -> None:
    """Every byte of a remembered name changed in turn: each answer is the general path's."""
    root = os.fsencode(str(world[0]))
    name = root + b"/ro/a.img"
    assert pair.same_twice(frame(name, 0))[0] == "fd"
    secret = os.stat(world[0] / "outside" / "secret")
    for at in range(len(name)):
        for byte in b"/.\x00b":
            changed = name[:at] + bytes([byte]) + name[at + 1 :]
            answer = pair.same_twice(frame(changed, 0))
            assert answer[:2] != ("fd", (secret.st_dev, secret.st_ino))
    # The same name with a byte more or less.
    for changed in (name + b"/", name[:-1], b"/" + name, name + b"\xff"):
        pair.same_twice(frame(changed, 0))


def test_refusals_and_failures_are_never_remembered(world: tuple[Path, Policy]) -> None:
    root = world[0]
    gate = Gate(world[1])
    try:
        for name, flags in [
            ("ro/a.img", os.O_RDWR), ("ro/nope", 0), ("ro/fifo", 0), ("ro/hard1", 0),
            ("ro/sub", 0), ("ro/lnk", 0), ("outside/secret", 0), ("ro/a.img", os.O_PATH),
            ("rw/d.img", os.O_RDWR | os.O_TRUNC), ("rw/new", os.O_RDWR | os.O_CREAT),
        ]:  # fmt: skip
            request = OpenRequest(path=os.fsencode(f"{root}/{name}"), flags=flags, mode=0)
            outcome = gate.handle(request)
            gate.remember(request, outcome)
            if outcome.fd is not None:
                os.close(outcome.fd)
            assert outcome.fd is None or flags & os.O_TRUNC
        # O_TRUNC and O_CREAT are never remembered, even granted: and nothing else here was.
        assert gate.decisions == {}
    finally:
        gate.close()


def test_the_broker_remembers_no_refusal(world: tuple[Path, Policy], pair: Pair) -> None:
    root = os.fsencode(str(world[0]))
    for name in (b"ro/nope", b"ro/fifo", b"ro/hard1", b"ro/sub", b"outside/secret", b"ro/out"):
        pair.same_twice(frame(root + b"/" + name, 0))
    pair.same_twice(frame(root + b"/ro/a.img", os.O_WRONLY))
    assert pair.fast.gate.decisions == {}


@pytest.fixture
def swap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Pair]]:
    (tmp_path / "g").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"secret")
    (tmp_path / "g" / "x.img").write_bytes(b"x")
    p = Pair(Policy.from_grants(ro=[tmp_path / "g"]), monkeypatch)
    yield tmp_path, p
    p.close()


def _replace(path: Path, how: str, outside: Path) -> None:
    path.unlink()
    if how == "fifo":
        os.mkfifo(path)
    elif how == "symlink":
        path.symlink_to(outside)
    elif how == "hardlink":
        os.link(outside, path)
    elif how == "directory":
        path.mkdir()
    elif how == "file":
        path.write_bytes(b"new")


@pytest.mark.parametrize("how", ["fifo", "symlink", "hardlink", "directory", "file", "gone"])
def test_the_tree_changing_under_a_decision(swap: tuple[Path, Pair], how: str) -> None:
    """A decision names a path, never an inode: what is there now is checked again."""
    root, pair = swap
    x, secret = root / "g" / "x.img", root / "outside" / "secret"
    request = frame(os.fsencode(str(x)), 0)
    assert pair.fast_peer.ask(request)[0] == "fd"
    assert pair.fast_peer.ask(request)[0] == "fd"
    assert pair.replayed == 1 and pair.fast.gate.decisions
    _replace(x, how, secret)
    with OpenWatch(secret, *([x] if how == "fifo" else [])) as watch:
        got = pair.fast_peer.ask(request)
        assert got == pair.general_peer.ask(request)
        assert watch.opened() == []  # neither the FIFO nor the file outside was opened
    if how == "file":
        st_ = os.stat(x)
        assert got[:2] == ("fd", (st_.st_dev, st_.st_ino))  # the new inode, not the old one
    elif how == "gone":
        assert got == ("errno", 2)
    else:
        assert got == ("errno", 13)


def test_the_decisions_are_bounded(tmp_path: Path) -> None:
    """More granted names than FAST_ENTRIES, names too long, names that fail: bounded."""
    grant = tmp_path / "g"
    grant.mkdir()
    gate = Gate(Policy.from_grants(ro=[grant]))
    try:
        long_name = "n" * (FAST_NAME_MAX - len(str(grant)))
        for i in range(FAST_ENTRIES + 50):
            (grant / f"{i:04d}").write_bytes(b"")
        (grant / long_name).write_bytes(b"")
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for name in [f"{i:04d}" for i in range(FAST_ENTRIES + 50)] + [long_name]:
            request = OpenRequest(path=os.fsencode(f"{grant}/{name}"), flags=0, mode=0)
            outcome = gate.handle(request)
            assert outcome.fd is not None
            gate.remember(request, outcome)
            os.close(outcome.fd)
        assert len(gate.decisions) == FAST_ENTRIES
        assert f"{grant}/0000".encode() not in [d.request.path for d in gate.decisions.values()]
        for i in range(2000):  # endless distinct names that do not resolve: nothing kept
            request = OpenRequest(path=os.fsencode(f"{grant}/missing{i}"), flags=0, mode=0)
            outcome = gate.handle(request)
            assert outcome.fd is None
            gate.remember(request, outcome)
        assert len(gate.decisions) == FAST_ENTRIES
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        # docs/broker.md: at most FAST_ENTRIES entries of at most 2 KiB each.
        assert grown < FAST_ENTRIES * 2048
    finally:
        gate.close()


def test_worst_case_entries_fit_the_documented_bound(tmp_path: Path) -> None:
    """FAST_ENTRIES decisions for names of FAST_NAME_MAX bytes: under 512 KiB in all."""
    grant = tmp_path / "g"
    grant.mkdir()
    gate = Gate(Policy.from_grants(ro=[grant]))
    try:
        pad = FAST_NAME_MAX - len(str(grant)) - 6
        names = [f"{i:05d}" + "p" * pad for i in range(FAST_ENTRIES)]
        for name in names:
            (grant / name).write_bytes(b"")
        requests = [OpenRequest(path=os.fsencode(f"{grant}/{n}"), flags=0, mode=0) for n in names]
        assert {len(r.path) for r in requests} == {FAST_NAME_MAX}
        outcomes = [gate.handle(request) for request in requests]
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for request, outcome in zip(requests, outcomes, strict=True):
            assert outcome.fd is not None
            # A copy made here, as the decoder makes one per request: it is counted.
            path = request.path[:1] + request.path[1:]
            gate.remember(OpenRequest(path=path, flags=0, mode=0), outcome)
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        for outcome in outcomes:
            assert outcome.fd is not None
            os.close(outcome.fd)
        assert len(gate.decisions) == FAST_ENTRIES
        assert grown < 512 * 1024, grown
    finally:
        gate.close()


def test_closing_the_gate_forgets_its_decisions(world: tuple[Path, Policy]) -> None:
    gate = Gate(world[1])
    request = OpenRequest(path=os.fsencode(f"{world[0]}/ro/a.img"), flags=0, mode=0)
    outcome = gate.handle(request)
    assert outcome.fd is not None
    gate.remember(request, outcome)
    os.close(outcome.fd)
    assert len(gate.decisions) == 1
    with pytest.raises(AttributeError):
        gate.policy = Policy()  # type: ignore[misc]  # a gate's policy is fixed: a new one, a new gate
    gate.close()
    assert gate.decisions == {}


def _audit_key(record: Any) -> tuple[Any, ...]:
    data = dataclasses.asdict(record)
    data.pop("time")
    data.pop("latency_us")
    return tuple(sorted(data.items()))


def test_audit_records_are_the_same_on_both_paths(
    world: tuple[Path, Policy], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same sequence through an audited broker with and without its fast path."""
    files = {"fast": {"audit_path": tmp_path / "fast.jsonl"},
             "general": {"audit_path": tmp_path / "general.jsonl"}}  # fmt: skip
    pair = Pair(world[1], monkeypatch, **files)
    root = os.fsencode(str(world[0]))
    sequence = [
        frame(root + b"/" + os.fsencode(name), flags, mode)
        for name in NAMES
        for flags, mode in ((0, 0), (os.O_RDWR, 0), (os.O_NONBLOCK, 0o644))
    ] + [frame(root + b"/ro/\xff.img", 0), frame(root + b"/ro/a\0", 0)]
    try:
        for data in sequence * 2:
            assert pair.fast_peer.ask(data) == pair.general_peer.ask(data)
        assert pair.replayed == 21  # 10 replayable names x 2 flag sets, O_RDWR of rw/d.img
    finally:
        pair.close()
    fast, general = pair.fast.audit.snapshot(), pair.general.audit.snapshot()
    assert len(fast) == len(general) == 2 * len(sequence)
    assert [_audit_key(r) for r in fast] == [_audit_key(r) for r in general]

    # The files too, line by line, but for time and latency.
    def lines(path: Path) -> list[str]:
        import json

        out = []
        for line in path.read_text().splitlines():
            data = json.loads(line)
            data.pop("time"), data.pop("latency_us")
            out.append(json.dumps(data, sort_keys=True))
        return out

    assert lines(tmp_path / "fast.jsonl") == lines(tmp_path / "general.jsonl")


def test_an_unwritable_audit_log_fails_closed_on_the_fast_path(
    world: tuple[Path, Policy], monkeypatch: pytest.MonkeyPatch
) -> None:
    from testbed.errors import AuditWriteError

    pair = Pair(world[1], monkeypatch)
    try:
        request = frame(os.fsencode(f"{world[0]}/ro/a.img"), 0)
        assert pair.fast_peer.ask(request)[0] == "fd"
        assert pair.fast_peer.ask(request)[0] == "fd"
        assert pair.replayed == 1

        def full(record: Any) -> None:
            raise AuditWriteError("audit.jsonl", 28, "write failed: No space left on device")

        monkeypatch.setattr(pair.fast.audit, "write", full)
        sync = frame(b"relative", 0)  # a round trip: the broker closed its copies before it
        pair.fast_peer.ask(sync)
        before = len(os.listdir("/proc/self/fd"))
        assert pair.fast_peer.ask(request) == ("errno", 5)  # not audited: not granted
        assert pair.replayed == 2  # the fast path answered it
        pair.fast_peer.ask(sync)
        assert len(os.listdir("/proc/self/fd")) == before  # and closed the fd it had opened
        assert pair.fast.audit.records[-1].result == -5
    finally:
        pair.close()


def test_a_remembered_frame_inside_a_partial_one_is_not_a_request(
    world: tuple[Path, Policy], pair: Pair
) -> None:
    """Bytes equal to a remembered frame, arriving mid-frame, are the rest of that frame."""
    request = frame(os.fsencode(f"{world[0]}/ro/a.img"), 0)
    assert pair.same_twice(request)[0] == "fd"
    for peer in (pair.fast_peer, pair.general_peer):
        peer.sock.sendall(request[:5])
        time.sleep(0.05)  # separate reads: the broker holds 5 bytes of a frame
        peer.sock.sendall(request)
        time.sleep(0.05)
        with contextlib.suppress(BrokenPipeError):  # closed already, see below
            peer.sock.sendall(request[5:])
        # The stream is request[:5] + request + ...: a broken frame (its command
        # is made of the size's bytes), so the connection is closed unanswered.
        try:
            reply, anc, _flags, _ = peer.sock.recvmsg(REPLY.size, CMSG_SPACE)
        except ConnectionResetError:
            reply, anc = b"", []
        assert (reply, parse_rights(anc)) == (b"", [])


def test_a_forked_child_replays_through_its_own_proc_fd(world: tuple[Path, Policy]) -> None:
    """A replayed decision reopens through the child's /proc/self/fd, not the parent's."""
    gate = Gate(world[1])
    target = world[0] / "ro" / "b.img"
    request = OpenRequest(path=os.fsencode(str(target)), flags=0, mode=0)
    outcome = gate.handle(request)  # the parent's /proc/self/fd dirfd exists now
    assert outcome.fd is not None
    gate.remember(request, outcome)
    os.close(outcome.fd)
    (decision,) = gate.decisions.values()
    want = os.stat(target)
    pid = os.fork()
    if pid == 0:
        try:
            fd = gate.open_decided(decision)
            st_ = os.fstat(fd)
            os._exit(0 if (st_.st_dev, st_.st_ino) == (want.st_dev, want.st_ino) else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    gate.close()
