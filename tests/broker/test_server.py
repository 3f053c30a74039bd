"""The broker's event loop: many peers, bad peers, fd hygiene, the audit log."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from testbed.broker import Broker, Policy, Runstate, read_audit, serve_socketpair
from testbed.errors import BrokerStateError, TransportError
from testbed.protocol import encode_request
from testbed.pytest_plugin import missing
from testbed.transport import HookClient
from tests.conftest import BrokerPair, open_fds

HERE = Path(__file__).parent


def wait_for(cond: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_audit_log_records_every_request_in_order(grant_dir: Path, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    ours, theirs = socket.socketpair()
    with Broker(Policy.from_grants(ro=[grant_dir]), audit_path=audit) as broker:
        broker.add_connection(ours)
        client = HookClient(theirs)
        os.close(client.open(str(grant_dir / "disk.img"), os.O_RDONLY))
        with pytest.raises(PermissionError):
            client.open(str(grant_dir / "disk.img"), os.O_RDWR)
        with pytest.raises(FileNotFoundError):
            client.open(str(grant_dir / "nope"), os.O_RDONLY | os.O_NONBLOCK)
        client.close()
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    assert [(r["path"].rsplit("/", 1)[1], r["result"]) for r in lines] == [
        ("disk.img", 0),
        ("disk.img", -13),
        ("nope", -2),
    ]
    first = lines[0]
    for key in ("time", "peer_pid", "path", "flags", "flag_names", "mode", "result", "latency_us"):
        assert key in first
    assert first["peer_pid"] == os.getpid()
    assert lines[2]["flag_names"] == ["O_RDONLY", "O_NONBLOCK"]
    assert lines[1]["reason"].startswith("needs rw access")
    assert [r.path for r in read_audit(audit)] == [r["path"] for r in lines]


def test_a_request_is_logged_before_its_reply_arrives(grant_dir: Path, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    ours, theirs = socket.socketpair()
    with Broker(Policy.from_grants(ro=[grant_dir]), audit_path=audit) as broker:
        broker.add_connection(ours)
        client = HookClient(theirs)
        for i in range(200):
            os.close(client.open(str(grant_dir / "disk.img"), os.O_RDONLY))
            assert len(broker.records) == i + 1
            assert len(audit.read_text().splitlines()) == i + 1
        client.close()


def test_refusal_keeps_the_connection_usable(grant_dir: Path, make_pair: type[BrokerPair]) -> None:
    pair = make_pair(Policy.from_grants(ro=[grant_dir]))
    for _ in range(3):
        with pytest.raises(PermissionError):
            pair.client.open("/etc/shadow", os.O_RDONLY)
        os.close(pair.client.open(str(grant_dir / "disk.img"), os.O_RDONLY))


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack("=II", 4, 1),
        struct.pack("=II", 30, 9) + b"x" * 22,
        struct.pack("=IIIIH", 18 + 4, 1, 0, 0, 99) + b"/abc",
        struct.pack("=II", 0xFFFFFFFF, 1),
    ],
)
def test_malformed_frame_closes_only_that_connection(
    grant_dir: Path, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="testbed.broker")
    policy = Policy.from_grants(ro=[grant_dir])
    good_ours, good_theirs = socket.socketpair()
    bad_ours, bad_theirs = socket.socketpair()
    with Broker(policy) as broker:
        broker.add_connection(good_ours)
        broker.add_connection(bad_ours)
        bad_theirs.sendall(garbage)
        bad_theirs.settimeout(5)
        assert bad_theirs.recv(100) == b""  # the broker hung up on the bad peer
        good = HookClient(good_theirs)
        os.close(good.open(str(grant_dir / "disk.img"), os.O_RDONLY))
    bad_theirs.close()
    good_theirs.close()
    assert any("malformed frame" in r.getMessage() for r in caplog.records)  # and says why


def test_peer_sending_fds_is_dropped(grant_dir: Path) -> None:
    from testbed.transport import send_frame

    ours, theirs = socket.socketpair()
    r, w = os.pipe()
    with Broker(Policy.from_grants(ro=[grant_dir])) as broker:
        broker.add_connection(ours)
        send_frame(theirs, encode_request(str(grant_dir / "disk.img"), 0), [r])
        theirs.settimeout(5)
        assert theirs.recv(100) == b""
    for x in (r, w):
        os.close(x)
    theirs.close()


def test_slow_idle_and_vanishing_peers_cost_nothing(grant_dir: Path) -> None:
    policy = Policy.from_grants(ro=[grant_dir])
    with Broker(policy) as broker:
        # a peer that sends half a frame and stalls, one that never speaks,
        # one that vanishes mid-request, one that floods without reading
        half_o, half_t = socket.socketpair()
        idle_o, idle_t = socket.socketpair()
        gone_o, gone_t = socket.socketpair()
        flood_o, flood_t = socket.socketpair()
        for s in (half_o, idle_o, gone_o, flood_o):
            broker.add_connection(s)
        frame = encode_request(str(grant_dir / "disk.img"), os.O_RDONLY)
        half_t.sendall(frame[:7])
        gone_t.sendall(frame[:10])
        gone_t.close()
        flood_t.setblocking(False)
        sent = 0
        try:
            while sent < 200_000:
                sent += flood_t.send(frame * 100)
        except BlockingIOError:
            pass
        good_o, good_t = socket.socketpair()
        broker.add_connection(good_o)
        # Were the good peer blocked behind the bad ones, its open would
        # raise WaitTimeout naming the request.
        client = HookClient(good_t, timeout=10)
        for _ in range(50):
            os.close(client.open(str(grant_dir / "disk.img"), os.O_RDONLY))
        # the flooder holds only a bounded number of undelivered fds
        assert len(os.listdir("/proc/self/fd")) < 200
        for s in (half_t, idle_t, flood_t, good_t):
            s.close()


def _client_proc(sock_path: str, path: str, n: int, q: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    c = HookClient(s, timeout=30)
    before = len(os.listdir("/proc/self/fd"))
    ok = 0
    for i in range(n):
        fd = c.open(path, os.O_RDONLY)
        if os.pread(fd, 10, 0) == b"disk-bytes":
            ok += 1
        os.close(fd)
        if i % 50 == 0:
            try:
                c.open(path, os.O_RDWR)
            except PermissionError:
                ok += 0
    after = len(os.listdir("/proc/self/fd"))
    c.close()
    q.put((ok, before, after))


@pytest.mark.slow
def test_64_clients_x_500_requests(grant_dir: Path, tmp_path: Path) -> None:
    sock_path = str(tmp_path / "b.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sock_path)
    listener.listen(128)
    ctx = multiprocessing.get_context("fork")
    q: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    before = open_fds() - {listener.fileno()}
    with Broker(Policy.from_grants(ro=[grant_dir]), keep_records=True) as broker:
        broker.add_listener(listener)
        procs = [
            ctx.Process(target=_client_proc, args=(sock_path, str(grant_dir / "disk.img"), 500, q))
            for _ in range(64)
        ]
        for p in procs:
            p.start()
        results = [q.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
            p.close()
        wait_for(lambda: not broker._conns, "the broker to see all 64 clients hang up")
        records = broker.records
    assert all(ok == 500 for ok, _, _ in results)
    assert all(b == a for _, b, a in results)  # clients leaked no fd
    assert len(records) == 64 * (500 + 10)
    assert sum(r.result == 0 for r in records) == 64 * 500
    assert len(open_fds()) == len(before)  # nor did the broker (the queue may renumber)


def test_peer_uid_filter(grant_dir: Path) -> None:
    ours, theirs = socket.socketpair()
    with Broker(Policy.from_grants(ro=[grant_dir], peer_uid=os.getuid() + 1)) as broker:
        broker.add_connection(ours)
        theirs.settimeout(5)
        with pytest.raises(TransportError):
            HookClient(theirs).open(str(grant_dir / "disk.img"), 0)
    theirs.close()
    ours2, theirs2 = socket.socketpair()
    with Broker(Policy.from_grants(ro=[grant_dir], peer_pid=os.getpid())) as broker:
        broker.add_connection(ours2)
        os.close(HookClient(theirs2).open(str(grant_dir / "disk.img"), 0))
    theirs2.close()


def test_rfc_peer_in_c(grant_dir: Path, tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        missing("no C compiler (cc) to build the independent RFC peer")
    exe = tmp_path / "rfc_peer"
    subprocess.run(
        [cc, "-O2", "-Wall", "-Werror", "-o", str(exe), str(HERE / "rfc_peer.c")], check=True
    )
    policy = Policy.from_grants(ro=[grant_dir])
    with Broker(policy) as broker:
        for path, flags, want in [
            (grant_dir / "disk.img", "0", "fd "),
            (grant_dir / "disk.img", "2", "errno 13"),
            (grant_dir / "missing", "0", "errno 2"),
        ]:
            ours, theirs = socket.socketpair()
            broker.add_connection(ours)
            out = subprocess.run(
                [str(exe), str(theirs.fileno()), str(path), flags, "0"],
                pass_fds=[theirs.fileno()],
                capture_output=True,
                text=True,
                timeout=20,
            )
            theirs.close()
            assert out.returncode == 0, out.stderr
            assert out.stdout.startswith(want)
            if want == "fd ":
                assert out.stdout.split(" ", 2)[2].startswith("disk-bytes")


def test_stop_soon_needs_no_lock_the_interrupted_code_may_hold(grant_dir: Path) -> None:
    # A signal handler runs between two bytecodes of the thread it interrupts,
    # which may be inside threading.Event's (non-reentrant) lock: stopping
    # from a handler must not wait on it, or the broker hangs in futex_wait.
    import threading

    broker, theirs = serve_socketpair(Policy.from_grants(ro=[grant_dir]))
    theirs.close()
    done = threading.Event()

    def interrupted_inside_the_lock() -> None:
        with broker._stop._cond:  # what the handler finds held
            broker.stop_soon()
        done.set()

    t = threading.Thread(target=interrupted_inside_the_lock, daemon=True)
    t.start()
    t.join(5)
    assert done.is_set(), "stop_soon() waited on a lock its caller holds"
    broker.stop()


def test_lifecycle_moves_forward_only(grant_dir: Path) -> None:
    broker = Broker(Policy.from_grants(ro=[grant_dir]))
    assert broker.runstate is Runstate.IDLE
    broker.start()
    assert broker.runstate is Runstate.RUNNING
    with pytest.raises(BrokerStateError, match="cannot start the broker") as err:
        broker.start()
    assert err.value.state == "running"
    broker.stop()
    assert broker.runstate is Runstate.CLOSED
    # a closed broker has no epoll, pipe or audit log left to serve with
    with pytest.raises(BrokerStateError, match=r"cannot serve \(broker is closed\)"):
        broker.serve()


def test_serve_in_the_caller_closes_when_stopped_first(grant_dir: Path) -> None:
    broker = Broker(Policy.from_grants(ro=[grant_dir]))
    broker.stop_soon()  # as a signal handler would, before the loop ran
    broker.serve()
    assert broker.runstate is Runstate.CLOSED
    with pytest.raises(BrokerStateError):
        broker.start()
