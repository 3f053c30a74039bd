"""The broker decides on the inode before opening it: directories, devices,
FIFOs, mount points, trailing slashes, O_TMPFILE, absolute symlinks.

Each class is tried twice: against the :class:`Gate` in-process (as root),
and against a real broker process, as root and as an unprivileged user with
every capability dropped.  Each test also has a witness that would catch a
broker that let the class through: the kind of the descriptor handed out,
inotify ``IN_OPEN`` events on what must not be opened, a FIFO writer that
must stay blocked.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.broker import Policy
from testbed.broker.gate import MAXSYMLINKS, Gate
from testbed.broker.policy import Access, Grant
from testbed.protocol import OpenRequest
from testbed.pytest_plugin import missing
from tests.broker.brokerproc import BrokerProc, need_root
from tests.broker.fswatch import OpenWatch

EACCES = -errno.EACCES
USERS = ["root", "nobody"]


def req(path: str | Path, flags: int = os.O_RDONLY, mode: int = 0) -> OpenRequest:
    return OpenRequest(path=os.fsencode(str(path)), flags=flags, mode=mode)


def outcome(gate: Gate, path: str | Path, flags: int = os.O_RDONLY, mode: int = 0) -> int:
    """The result; any fd handed out must not be a directory, and is closed."""
    out = gate.handle(req(path, flags, mode))
    if out.fd is not None:
        kind = stat.S_IFMT(os.fstat(out.fd).st_mode)
        os.close(out.fd)
        assert kind != stat.S_IFDIR, f"a directory fd for {path} {flags:#o}"
    return out.result


@pytest.fixture
def tree(public: Path) -> Path:
    """grant/ (files, a subdirectory, a FIFO, /dev/null's twin) and outside/."""
    need_root()
    grant, outside = public / "grant", public / "outside"
    grant.mkdir()
    outside.mkdir()
    (grant / "disk.img").write_bytes(b"disk-bytes")
    (grant / "sub").mkdir()
    (grant / "sub" / "f").write_bytes(b"sub-f")
    (outside / "secret").write_bytes(b"secret")
    os.mkfifo(grant / "fifo", 0o666)
    os.mknod(grant / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    for p in (grant, outside, grant / "sub"):
        p.chmod(0o777)
    for p in (grant / "disk.img", grant / "sub" / "f", outside / "secret"):
        p.chmod(0o666)
    (grant / "fifo").chmod(0o666)
    (grant / "null").chmod(0o666)
    return public


@pytest.fixture
def gate(tree: Path) -> Iterator[Gate]:
    g = Gate(Policy.from_grants(create=[tree / "grant"]))
    yield g
    g.close()


@pytest.fixture(params=USERS)
def served(request: pytest.FixtureRequest, tree: Path, broker_proc: Any) -> BrokerProc:
    grants = [{"path": str(tree / "grant"), "access": "create"}]
    return broker_proc(grants, user=request.param)  # type: ignore[no-any-return]


def hook_result(broker: BrokerProc, path: str | Path, flags: int = os.O_RDONLY) -> int:
    with broker.client() as client:
        try:
            fd = client.open(str(path), flags, 0o644)
        except OSError as err:
            return -(err.errno or 0)
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        os.close(fd)
        assert kind == stat.S_IFREG, f"a non-regular fd ({kind:#o}) for {path}"
        return 0


# -- 1. never a directory -------------------------------------------------


DIRECTORY_OPENS = [
    ("grant", os.O_RDONLY),
    ("grant/", os.O_RDONLY),
    ("grant/.", os.O_RDONLY),
    ("grant//", os.O_RDONLY),
    ("grant/sub", os.O_RDONLY),
    ("grant/sub/", os.O_RDONLY),
    ("grant/sub/..", os.O_RDONLY),
    ("grant/sub", os.O_RDONLY | os.O_DIRECTORY),
    ("grant/sub", os.O_RDONLY | os.O_NONBLOCK),
    ("grant/sub", os.O_RDWR | os.O_CREAT),
    ("grant/sub", os.O_PATH),
    ("grant/sub", os.O_TMPFILE | os.O_RDONLY),  # was turned into a plain directory open
    ("grant/sub", os.O_TMPFILE | os.O_RDWR),
    ("grant/sub", os.O_TMPFILE & ~os.O_DIRECTORY | os.O_RDWR),
]


@pytest.mark.parametrize(("name", "flags"), DIRECTORY_OPENS)
def test_no_directory_fd_from_the_gate(tree: Path, gate: Gate, name: str, flags: int) -> None:
    result = outcome(gate, f"{tree}/{name}", flags)
    assert result in (EACCES, -errno.EINVAL, -errno.EISDIR)


def test_tmpfile_answers_what_open_would_or_refuses(tree: Path, gate: Gate) -> None:
    sub = tree / "grant" / "sub"
    assert outcome(gate, sub, os.O_TMPFILE | os.O_RDONLY) == -errno.EINVAL
    assert outcome(gate, sub, (os.O_TMPFILE & ~os.O_DIRECTORY) | os.O_RDWR) == -errno.EINVAL
    assert outcome(gate, sub, os.O_TMPFILE | os.O_RDWR | os.O_CREAT) == -errno.EINVAL
    assert outcome(gate, sub, os.O_TMPFILE | os.O_RDWR) == EACCES
    assert os.listdir(sub) == ["f"]


@pytest.mark.parametrize(("name", "flags"), DIRECTORY_OPENS[:10])
def test_no_directory_fd_from_a_broker_process(
    served: BrokerProc, tree: Path, name: str, flags: int
) -> None:
    assert hook_result(served, f"{tree}/{name}", flags) != 0
    assert served.audit()[-1]["result"] < 0


def test_directories_rule_hands_out_directories(tree: Path) -> None:
    grant = tree / "grant"
    g = Gate(Policy(grants=(Grant(path=str(grant), access=Access.RO, directories=True),)))
    out = g.handle(req(grant / "sub", os.O_RDONLY | os.O_DIRECTORY))
    assert out.fd is not None
    # What the rule gives the peer: ".." from the fd walks out of the grant.
    up = os.open("../..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=out.fd)
    assert "outside" in os.listdir(up)
    os.close(up)
    os.close(out.fd)
    assert outcome(g, grant / "sub", os.O_RDWR) == -errno.EACCES  # rw needs an rw grant
    g.close()


# -- 2. never open a device node, FIFO or socket ---------------------------


FIFO_FLAGS = [
    os.O_RDONLY,
    os.O_RDONLY | os.O_NONBLOCK,
    os.O_RDWR,
    os.O_WRONLY | os.O_NONBLOCK,
    os.O_RDWR | os.O_CREAT,
    os.O_RDWR | os.O_TRUNC,
]


def _blocked_writer(fifo: Path) -> subprocess.Popen[bytes]:
    """A process blocked in open(FIFO, O_WRONLY) until someone opens it for reading."""
    code = f"import os; fd = os.open({str(fifo)!r}, os.O_WRONLY); os.write(fd, b'woken')"
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.2)
    assert proc.poll() is None, "the writer should be blocked in open()"
    return proc


def test_fifo_writer_is_not_woken_by_the_gate(tree: Path, gate: Gate) -> None:
    fifo = tree / "grant" / "fifo"
    writer = _blocked_writer(fifo)
    try:
        with OpenWatch(fifo, tree / "grant" / "null") as watch:
            for flags in FIFO_FLAGS:
                assert outcome(gate, fifo, flags) == EACCES
                assert outcome(gate, tree / "grant" / "null", flags) == EACCES
            time.sleep(0.1)
            assert writer.poll() is None, "the broker opened the FIFO: its writer woke up"
            assert watch.opened() == []
    finally:
        # Release the writer ourselves.
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        writer.wait(10)
        os.close(fd)


def test_fifo_and_device_not_opened_by_a_broker_process(served: BrokerProc, tree: Path) -> None:
    fifo, null = tree / "grant" / "fifo", tree / "grant" / "null"
    writer = _blocked_writer(fifo)
    try:
        with OpenWatch(fifo, null) as watch:
            for flags in FIFO_FLAGS:
                assert hook_result(served, fifo, flags) == EACCES
                assert hook_result(served, null, flags) == EACCES
            time.sleep(0.1)
            assert writer.poll() is None
            assert watch.opened() == []
        reasons = {r["reason"] for r in served.audit()}
        assert any("FIFO" in r for r in reasons) and any("character device" in r for r in reasons)
    finally:
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        writer.wait(10)
        os.close(fd)


def test_socket_node_refused(tree: Path, gate: Gate) -> None:
    import socket

    path = tree / "grant" / "sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    assert outcome(gate, path) == EACCES
    s.close()


def test_devices_rule_opens_without_blocking(tree: Path) -> None:
    grant = tree / "grant"
    g = Gate(Policy(grants=(Grant(path=str(grant), access=Access.RW, devices=True),)))
    out = g.handle(req(grant / "fifo", os.O_RDONLY))
    assert out.fd is not None and os.get_blocking(out.fd)  # our O_NONBLOCK taken off again
    os.close(out.fd)
    out = g.handle(req(grant / "null", os.O_RDWR))
    assert out.fd is not None and os.write(out.fd, b"x") == 1
    os.close(out.fd)
    g.close()


# -- 3. no mount crossings ---------------------------------------------------


@pytest.fixture
def bind_mount(tree: Path) -> Iterator[Path]:
    """outside/ bind-mounted at grant/mnt."""
    mnt = tree / "grant" / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "--bind", str(tree / "outside"), str(mnt)], check=False)
    if done.returncode:
        missing("mount --bind (root in a mount-capable environment) for the bind-mount attack")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_bind_mount_inside_a_grant_lends_nothing(tree: Path, gate: Gate, bind_mount: Path) -> None:
    with OpenWatch(tree / "outside" / "secret") as watch:
        assert outcome(gate, bind_mount / "secret") == EACCES
        assert outcome(gate, bind_mount / "secret", os.O_RDWR | os.O_CREAT) == EACCES
        assert outcome(gate, bind_mount / "new", os.O_RDWR | os.O_CREAT, 0o644) == EACCES
        assert watch.opened() == []
    assert not (tree / "outside" / "new").exists()
    out = gate.handle(req(bind_mount / "secret"))
    assert "cross_mounts" in out.reason


def test_bind_mount_refused_by_a_broker_process(served: BrokerProc, bind_mount: Path) -> None:
    assert hook_result(served, bind_mount / "secret") == EACCES
    assert "cross_mounts" in served.audit()[-1]["reason"]


def test_cross_mounts_rule(tree: Path, bind_mount: Path) -> None:
    g = Gate(Policy(grants=(Grant(path=str(tree / "grant"), access=Access.RO, cross_mounts=True),)))
    assert outcome(g, bind_mount / "secret") == 0
    g.close()


# -- 9. NAME/ on a regular file --------------------------------------------


def test_trailing_slash_on_a_file_is_enotdir(tree: Path, gate: Gate) -> None:
    disk = tree / "grant" / "disk.img"
    assert outcome(gate, f"{disk}/") == -errno.ENOTDIR
    assert outcome(gate, f"{disk}/", os.O_RDWR | os.O_CREAT, 0o644) in (
        -errno.ENOTDIR,
        -errno.EISDIR,
    )
    assert outcome(gate, f"{tree}/grant/new/", os.O_RDWR | os.O_CREAT, 0o644) == -errno.EISDIR
    file_grant = Gate(Policy.from_grants(ro=[disk]))
    assert outcome(file_grant, f"{disk}/") == -errno.ENOTDIR
    assert outcome(file_grant, disk) == 0
    file_grant.close()


def test_trailing_slash_by_a_broker_process(served: BrokerProc, tree: Path) -> None:
    assert hook_result(served, f"{tree}/grant/disk.img/") == -errno.ENOTDIR


# -- O_CREAT decides on the inode too ----------------------------------------


def test_create_never_follows_a_symlink_out(tree: Path) -> None:
    grant = tree / "grant"
    (grant / "dangling").symlink_to(tree / "outside" / "planted")
    (grant / "rel-dangling").symlink_to("../outside/planted2")
    for symlinks in (False, True):
        g = Gate(Policy.from_grants(create=[grant], symlinks=symlinks))
        for name in ("dangling", "rel-dangling"):
            assert outcome(g, grant / name, os.O_RDWR | os.O_CREAT, 0o644) == EACCES
            assert outcome(g, grant / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644) in (
                EACCES,
                -errno.EEXIST,
            )
        g.close()
    assert sorted(os.listdir(tree / "outside")) == ["secret"]


def test_create_through_an_absolute_symlink(tree: Path) -> None:
    """The hand walk keeps open(2)'s create rules: O_EXCL never follows, dangling is refused."""
    grant = tree / "grant"
    (grant / "to-disk").symlink_to(grant / "disk.img")
    (grant / "to-new").symlink_to(grant / "sub" / "new")
    g = Gate(Policy.from_grants(create=[grant], symlinks=True))
    assert outcome(g, grant / "to-disk", os.O_RDWR | os.O_CREAT, 0o644) == 0
    assert outcome(g, grant / "to-disk", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644) == (
        -errno.EEXIST
    )
    assert outcome(g, grant / "to-new", os.O_RDWR | os.O_CREAT, 0o644) == EACCES
    assert not (grant / "sub" / "new").exists()
    (grant / "abs-sub").symlink_to(grant / "sub")
    assert outcome(g, grant / "abs-sub" / "made", os.O_RDWR | os.O_CREAT, 0o644) == 0
    assert (grant / "sub" / "made").is_file()
    g.close()


def test_create_of_an_existing_file_checks_its_inode(tree: Path, gate: Gate) -> None:
    grant = tree / "grant"
    os.link(tree / "outside" / "secret", grant / "hard")
    assert outcome(gate, grant / "hard", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644) == EACCES
    assert (tree / "outside" / "secret").read_bytes() == b"secret"
    assert outcome(gate, grant / "fifo", os.O_WRONLY | os.O_CREAT, 0o644) == EACCES
    assert outcome(gate, grant / "disk.img", os.O_RDWR | os.O_CREAT, 0o644) == 0
    assert outcome(gate, grant / "fresh", os.O_RDWR | os.O_CREAT, 0o644) == 0
    assert outcome(gate, grant / "fresh", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644) == (
        -errno.EEXIST
    )


# -- 153: absolute symlinks under a grant that allows symlinks --------------


@pytest.fixture
def linked(tree: Path) -> Path:
    grant = tree / "grant"
    (grant / "abs").symlink_to(grant / "disk.img")  # absolute, stays inside
    (grant / "abs-dir").symlink_to(grant / "sub")
    (grant / "abs-out").symlink_to(tree / "outside" / "secret")
    (grant / "abs-dotdot").symlink_to(f"{grant}/sub/../../outside/secret")
    (grant / "rel-out").symlink_to("../outside/secret")
    (grant / "rel-in").symlink_to("sub/f")
    (grant / "chain").symlink_to(grant / "rel-in")
    (grant / "proc").symlink_to("/proc/self/root" + str(grant / "disk.img"))
    (grant / "loop").symlink_to(grant / "loop")
    hop = grant / "disk.img"
    for i in range(MAXSYMLINKS + 1):  # hopN -> ... -> hop0 -> disk.img: N + 1 links
        (grant / f"hop{i}").symlink_to(hop)
        hop = grant / f"hop{i}"
    return grant


def test_absolute_symlinks_beneath_the_grant_are_followed(tree: Path, linked: Path) -> None:
    g = Gate(Policy.from_grants(ro=[linked], symlinks=True))
    with OpenWatch(tree / "outside" / "secret") as watch:
        assert outcome(g, linked / "abs") == 0
        assert outcome(g, linked / "abs-dir" / "f") == 0
        assert outcome(g, linked / "chain") == 0
        assert outcome(g, linked / "rel-in") == 0
        assert outcome(g, linked / "abs-out") == EACCES
        assert outcome(g, linked / "abs-dotdot") == EACCES
        assert outcome(g, linked / "rel-out") == EACCES
        assert outcome(g, linked / "proc") == EACCES
        assert outcome(g, linked / "abs-dir") == EACCES  # a directory, still
        assert outcome(g, linked / "loop") == -errno.ELOOP
        assert outcome(g, linked / f"hop{MAXSYMLINKS - 1}") == 0  # 40 links
        assert outcome(g, linked / f"hop{MAXSYMLINKS}") == -errno.ELOOP  # 41
        assert outcome(g, linked / "abs", os.O_RDONLY | os.O_NOFOLLOW) == -errno.ELOOP
        assert watch.opened() == []
    fd = g.handle(req(linked / "abs")).fd
    assert fd is not None and os.read(fd, 20) == b"disk-bytes"
    os.close(fd)
    g.close()


def test_symlink_hops_must_stay_beneath_a_grant(tree: Path, linked: Path) -> None:
    other = tree / "outside"
    g = Gate(Policy.from_grants(ro=[linked, other / "secret"], symlinks=True))
    assert outcome(g, linked / "abs-out") == 0  # the target is granted (a file grant)
    g.close()
    g = Gate(Policy.from_grants(ro=[linked], rw=[other], symlinks=True))
    assert outcome(g, linked / "abs-out", os.O_RDWR) == EACCES  # ro grant holds the link
    g.close()


def test_without_the_rule_the_reason_says_so(linked: Path) -> None:
    g = Gate(Policy.from_grants(ro=[linked]))
    for name in ("abs", "rel-in", "abs-out"):
        out = g.handle(req(linked / name))
        assert out.result == EACCES and "does not allow symlinks" in out.reason
    g.close()


def test_absolute_symlinks_by_a_broker_process(
    linked: Path, broker_proc: Any, request: pytest.FixtureRequest
) -> None:
    for user in USERS:
        b = broker_proc([{"path": str(linked), "access": "ro", "symlinks": True}], user=user)
        assert hook_result(b, linked / "abs") == 0
        assert hook_result(b, linked / "abs-out") == EACCES
        assert hook_result(b, linked / "abs-dotdot") == EACCES


def test_symlink_swapped_in_during_a_walk(tree: Path, linked: Path) -> None:
    """Race a swapper against the hand walk: the secret never leaks."""
    import threading

    g = Gate(Policy.from_grants(ro=[linked], symlinks=True))
    (linked / "d").mkdir()
    (linked / "d" / "x").write_bytes(b"fine")
    (linked / "via").symlink_to(linked / "d")
    stop = threading.Event()

    def swapper() -> None:
        while not stop.is_set():
            os.rename(linked / "d", linked / "d.real")
            (linked / "d").symlink_to(tree / "outside")
            (linked / "d").unlink()
            os.rename(linked / "d.real", linked / "d")

    t = threading.Thread(target=swapper)
    t.start()
    try:
        for _ in range(1000):
            out = g.handle(req(linked / "via" / "secret"))
            if out.fd is not None:
                data = os.read(out.fd, 10)
                os.close(out.fd)
                assert data != b"secret"
    finally:
        stop.set()
        t.join()
        g.close()
