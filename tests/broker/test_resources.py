"""What a peer can make the broker spend: memory, CPU, descriptors, the audit disk.

Each test runs a real broker process (or, for the audit log, a broker in a
thread so its log records can be read) and measures the resource from
outside: RSS and CPU time from /proc, descriptors queued on the peer's
socket, the log lines the broker wrote.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from testbed.broker import Broker, Policy, read_audit
from testbed.broker.server import FD_REPLY_CAP
from testbed.protocol import encode_request
from testbed.pytest_plugin import missing
from testbed.transport import CMSG_SPACE, parse_rights
from tests.broker.brokerproc import UNPRIVILEGED, BrokerProc, need_root, wait_for

EMPTY_NAME = struct.pack("=IIIIH", 18, 1, 0, 0, 0)  # answered -ENOENT, no fd


@pytest.fixture
def grant(public: Path) -> Path:
    need_root()
    g = public / "grant"
    g.mkdir()
    g.chmod(0o755)
    (g / "disk.img").write_bytes(b"disk-bytes")
    (g / "disk.img").chmod(0o644)
    return g


def flood(sock: socket.socket, frame: bytes, count: int, per_send: int = 2000) -> None:
    """Send ``count`` frames while a thread reads (and drops) every reply."""
    expected = 12 * count
    got = 0

    def reader() -> None:
        nonlocal got
        while got < expected:
            data = sock.recv(1 << 16)
            if not data:
                return
            got += len(data)

    t = threading.Thread(target=reader)
    t.start()
    chunk = frame * per_send
    for _ in range(count // per_send):
        sock.sendall(chunk)
    t.join(120)
    assert got == expected, f"{got} of {expected} reply bytes"


# -- 4. memory bounded per connection ----------------------------------------


def test_rss_stays_flat_under_a_flood(grant: Path, broker_proc: Any) -> None:
    b: BrokerProc = broker_proc([{"path": str(grant), "access": "ro"}], audit=False)
    sock = b.raw()
    flood(sock, EMPTY_NAME, 2_000)  # warm-up: the first requests' allocations
    before = b.rss_kib()
    # Tiny frames are the worst case: one read holds hundreds of them.  The
    # old loop read 4 KiB per turn but answered 64: +3.7 MiB here.
    flood(sock, EMPTY_NAME, 400_000)
    huge = struct.pack("=IIIIH", 18 + 0xFFFF, 1, 0, 0, 0xFFFF) + b"/" * 0xFFFF
    flood(sock, huge, 300, per_send=10)  # names over PATH_MAX: answered, not stored
    after = b.rss_kib()
    sock.close()
    assert after - before <= 2048, f"RSS grew from {before} to {after} KiB"
    assert b.alive()
    with b.client() as c:
        os.close(c.open(str(grant / "disk.img"), os.O_RDONLY))


# -- 5. a full fd table does not spin the loop --------------------------------


def test_emfile_pauses_accepting_and_keeps_serving(grant: Path, broker_proc: Any) -> None:
    b: BrokerProc = broker_proc([{"path": str(grant), "access": "ro"}], nofile=64, audit=False)
    good = b.client()
    os.close(good.open(str(grant / "disk.img"), os.O_RDONLY))
    peers = []
    for _ in range(200):
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        if s.connect_ex(str(b.socket_path)) in (0, errno.EAGAIN):
            peers.append(s)
        else:
            s.close()
    time.sleep(0.5)
    cpu = b.cpu_seconds()
    time.sleep(2.0)
    spent = b.cpu_seconds() - cpu
    assert spent < 0.3, f"the broker spent {spent:.2f} s of CPU in 2 s with a full fd table"
    os.close(good.open(str(grant / "disk.img"), os.O_RDONLY))  # still served
    log = b.stderr()
    assert log.count("not accepting peers") == 1, log[-2000:]
    for s in peers:
        s.close()
    fresh = None
    deadline = time.monotonic() + 10
    while fresh is None:
        try:
            c = b.client(timeout=2)
            os.close(c.open(str(grant / "disk.img"), os.O_RDONLY))
            fresh = c
        except (OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    fresh.close()
    good.close()
    wait_for(lambda: "accepting peers again" in b.stderr(), "the end-of-episode log line")


# -- 6. descriptors in flight ------------------------------------------------


def unread_replies(sock: socket.socket) -> int:
    """Replies queued on ``sock`` and not read (SIOCINQ: bytes waiting, 12 a reply)."""
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4)
    return int(struct.unpack("i", raw)[0]) // 12


@pytest.mark.parametrize("user", ["root", "nobody"])
def test_a_peer_that_never_reads_holds_few_descriptors(
    grant: Path, broker_proc: Any, user: str
) -> None:
    b: BrokerProc = broker_proc([{"path": str(grant), "access": "ro"}], user=user, audit=False)
    with b.client() as warm:  # the grant root and /proc/self/fd are held open from now on
        os.close(warm.open(str(grant / "disk.img"), os.O_RDONLY))
    baseline = b.fd_count()
    frame = encode_request(str(grant / "disk.img"), os.O_RDONLY)
    hogs = [b.raw() for _ in range(8)]
    for h in hogs:
        h.sendall(frame * 600)
    time.sleep(0.5)
    innocent = b.client()
    for _ in range(20):
        os.close(innocent.open(str(grant / "disk.img"), os.O_RDONLY))
    # A socket and a held reply per hog; the innocent's socket; one spare.
    assert b.fd_count() <= baseline + 2 * len(hogs) + 2
    for h in hogs:
        assert unread_replies(h) <= FD_REPLY_CAP
    assert "closed" not in b.stderr()
    innocent.close()
    for h in hogs:
        h.close()


EATER = """
import os, socket, sys
a, b = socket.socketpair()
null = os.open("/dev/null", os.O_RDONLY)
n = int(sys.argv[1])
for _ in range(n):
    a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, null.to_bytes(4, sys.byteorder))])
print("ready", flush=True)
sys.stdin.read()
"""


def test_etoomanyrefs_holds_the_reply_and_closes_nobody(grant: Path, broker_proc: Any) -> None:
    """The broker's user has its quota of fds in flight used up by another process."""
    if shutil.which("setpriv") is None:
        missing("setpriv (util-linux) to run the broker as an unprivileged user")
    b: BrokerProc = broker_proc(
        [{"path": str(grant), "access": "ro"}], user="nobody", nofile=64, audit=False
    )
    innocent = b.raw()
    eater = subprocess.Popen(
        [*UNPRIVILEGED, sys.executable, "-c", EATER, "200"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert eater.stdout is not None and eater.stdout.readline() == "ready\n"
        innocent.sendall(encode_request(str(grant / "disk.img"), os.O_RDONLY))
        ready, _, _ = select.select([innocent], [], [], 0.5)
        assert not ready, "the reply went out although the quota is full (no ETOOMANYREFS?)"
    finally:
        assert eater.stdin is not None
        eater.stdin.close()
        eater.wait(10)
    innocent.settimeout(10)
    data, anc, _flags, _ = innocent.recvmsg(12, CMSG_SPACE)
    assert struct.unpack("=IIi", data) == (12, 1, 0)
    fds = parse_rights(anc)
    assert len(fds) == 1 and os.pread(fds[0], 4, 0) == b"disk"
    os.close(fds[0])
    # The connection is still served.
    innocent.sendall(encode_request(str(grant / "disk.img"), os.O_RDONLY))
    data, anc, _flags, _ = innocent.recvmsg(12, CMSG_SPACE)
    assert struct.unpack("=IIi", data)[2] == 0
    for fd in parse_rights(anc):
        os.close(fd)
    innocent.close()
    log = b.stderr()
    assert log.count("ETOOMANYREFS") == 1 and "closed" not in log, log


# -- 7. a failing audit log fails closed ---------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Any:
    need_root()
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)]).returncode:
        missing("mount -t tmpfs (root in a mount-capable environment) for a full audit file system")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_full_audit_disk_fails_closed_and_recovers(
    grant: Path, tiny_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="testbed.broker")
    audit = tiny_fs / "audit.jsonl"
    ours, theirs = socket.socketpair()
    disk = str(grant / "disk.img")
    with Broker(Policy.from_grants(ro=[grant]), audit_path=audit) as broker:
        broker.add_connection(ours)
        from testbed.transport import HookClient

        client = HookClient(theirs, timeout=10)
        os.close(client.open(disk, os.O_RDONLY))
        fill(tiny_fs / "filler")
        refused = 0
        for _ in range(200):  # the last page of the log may still take a few records
            try:
                os.close(client.open(disk, os.O_RDONLY))
            except OSError as err:
                assert err.errno == errno.EIO
                refused += 1
                if refused == 20:
                    break
        assert refused == 20, "a full audit disk never refused a request"
        assert broker._thread is not None and broker._thread.is_alive()
        (tiny_fs / "filler").unlink()
        os.close(client.open(disk, os.O_RDONLY))  # recovered
        client.close()
        records = broker.records
    failures = [r for r in caplog.records if "write failed" in r.getMessage()]
    assert len(failures) == 1  # once per episode
    assert any("writable again after 20" in r.getMessage() for r in caplog.records)
    assert sum(r.result == -errno.EIO for r in records) == 20
    on_disk = read_audit(audit)  # every line is a whole record
    assert all(r.result == 0 for r in on_disk)
    assert len(on_disk) == len(records) - 20


# -- 8. the audit log is strict JSON --------------------------------------------


def strict_strings(value: Any) -> None:
    """Every string in ``value`` is valid Unicode (no lone surrogates)."""
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for k, v in value.items():
            strict_strings(k)
            strict_strings(v)
    elif isinstance(value, list):
        for v in value:
            strict_strings(v)


def test_audit_log_is_strict_json(grant: Path, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    names = [
        os.fsencode(str(grant)) + b"/\xff\xfe-not-utf8",
        os.fsencode(str(grant)) + "/é-utf8".encode(),
        os.fsencode(str(grant)) + b"/link-\xff",
    ]
    os.symlink(b"/outside/\xff", os.fsencode(str(grant)) + b"/link-\xff")
    ours, theirs = socket.socketpair()
    from testbed.transport import HookClient

    policy = Policy.from_grants(ro=[grant], symlinks=True)
    with Broker(policy, audit_path=audit) as broker:
        broker.add_connection(ours)
        client = HookClient(theirs)
        for name in names:
            with pytest.raises(OSError):
                client.open(name, os.O_RDONLY)
        client.close()
    raw = audit.read_bytes()
    assert raw.isascii()
    lines = raw.decode().splitlines()
    assert len(lines) == 3
    for line in lines:
        strict_strings(json.loads(line))
    first = json.loads(lines[0])
    assert bytes.fromhex(first["path_hex"]) == names[0]
    assert "\ufffd" in first["path"] and first["via"] == "hook"
    assert "path_hex" not in json.loads(lines[1])  # valid UTF-8 needs no hex
    assert [r.path_bytes for r in read_audit(audit)] == names
    if shutil.which("jq"):
        subprocess.run(["jq", "-e", ".path", str(audit)], check=True, capture_output=True)


def test_audit_record_extra_fields() -> None:
    from testbed.broker import AuditRecord

    rec = AuditRecord(
        time=1.0,
        conn=1,
        peer_pid=2,
        path="/x",
        flags=0,
        flag_names=("O_RDONLY",),
        mode=0,
        result=0,
        latency_us=1.0,
        via="seccomp",
        tid=4243,
    )
    data = json.loads(rec.json_line())
    assert data["via"] == "seccomp" and data["tid"] == 4243
    assert AuditRecord.from_mapping(data) == rec
    assert "tid" not in json.loads(
        AuditRecord(**{**data, "tid": None, "flag_names": ()}).json_line()  # type: ignore[arg-type]
    )


class FullTable(socket.socket):
    """A listener whose accept() always finds the descriptor table full."""

    calls = 0

    def accept(self) -> tuple[socket.socket, Any]:
        self.calls += 1
        raise OSError(errno.EMFILE, "Too many open files")


def test_emfile_on_accept_backs_off(
    grant: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="testbed.broker")
    listener = FullTable(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "l.sock"))
    listener.listen(8)
    waiting = socket.socket(socket.AF_UNIX)
    waiting.connect(str(tmp_path / "l.sock"))  # the listener stays readable
    ours, theirs = socket.socketpair()
    from testbed.transport import HookClient

    with Broker(Policy.from_grants(ro=[grant])) as broker:
        broker.add_connection(ours)
        broker.add_listener(listener)
        client = HookClient(theirs)
        time.sleep(1.0)
        os.close(client.open(str(grant / "disk.img"), os.O_RDONLY))  # still served
        calls = listener.calls
        client.close()
    waiting.close()
    assert 1 <= calls <= 12, f"accept() called {calls} times in 1 s with a full fd table"
    assert sum("not accepting peers" in r.getMessage() for r in caplog.records) == 1
