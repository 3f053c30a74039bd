"""The broker's decisions: grants, access levels and an attack set."""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from testbed.broker import Policy
from testbed.broker.gate import Gate
from testbed.protocol import InvalidRequest, OpenRequest
from tests.conftest import BrokerPair


def req(path: str | Path, flags: int = os.O_RDONLY, mode: int = 0) -> OpenRequest:
    return OpenRequest(path=os.fsencode(str(path)), flags=flags, mode=mode)


def result(gate: Gate, path: str | Path, flags: int = os.O_RDONLY, mode: int = 0) -> int:
    out = gate.handle(req(path, flags, mode))
    if out.fd is not None:
        os.close(out.fd)
    return out.result


EACCES = -errno.EACCES


def test_allowed_open_gives_a_working_fd(grant_dir: Path, make_pair: type[BrokerPair]) -> None:
    pair = make_pair(Policy.from_grants(ro=[grant_dir]))
    fd = pair.client.open(str(grant_dir / "disk.img"), os.O_RDONLY)
    assert os.read(fd, 100) == b"disk-bytes"
    os.close(fd)


def test_access_levels(grant_dir: Path, tmp_path: Path) -> None:
    ro, rw, cr = tmp_path / "ro", tmp_path / "rw", tmp_path / "cr"
    for d in (ro, rw, cr):
        d.mkdir()
        (d / "f").write_text("x")
    gate = Gate(Policy.from_grants(ro=[ro], rw=[rw], create=[cr]))
    assert result(gate, ro / "f") == 0
    assert result(gate, ro / "f", os.O_RDWR) == EACCES
    assert result(gate, ro / "f", os.O_WRONLY) == EACCES
    assert result(gate, ro / "f", os.O_RDONLY | os.O_TRUNC) == EACCES
    assert result(gate, ro / "f", os.O_RDONLY | os.O_APPEND) == EACCES
    assert result(gate, rw / "f", os.O_RDWR) == 0
    assert result(gate, rw / "new", os.O_RDWR | os.O_CREAT, 0o644) == EACCES
    assert not (rw / "new").exists()
    assert result(gate, cr / "new", os.O_RDWR | os.O_CREAT, 0o644) == 0
    assert (cr / "new").exists()
    assert result(gate, cr / "new", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644) == -errno.EEXIST
    assert result(gate, tmp_path / "elsewhere", os.O_RDONLY) == EACCES
    gate.close()


def test_create_mode_is_masked(tmp_path: Path) -> None:
    gate = Gate(Policy.from_grants(create=[tmp_path]))
    old = os.umask(0)
    try:
        assert result(gate, tmp_path / "suid", os.O_RDWR | os.O_CREAT, 0o6777) == 0
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "suid").stat().st_mode)
    assert mode == 0o775  # no setuid/setgid/sticky, not world-writable
    gate.close()


def test_errors_that_are_not_policy_pass_through(grant_dir: Path) -> None:
    gate = Gate(Policy.from_grants(ro=[grant_dir]))
    assert result(gate, grant_dir / "missing") == -errno.ENOENT
    assert result(gate, grant_dir / "disk.img" / "x") == -errno.ENOTDIR
    gate.close()


def test_relative_and_invalid_requests(grant_dir: Path) -> None:
    gate = Gate(Policy.from_grants(ro=[grant_dir]))
    assert result(gate, "disk.img") == EACCES
    bad = gate.handle(
        InvalidRequest(path=b"/a\0b", flags=0, mode=0, errno=errno.EINVAL, reason="NUL")
    )
    assert bad.result == -errno.EINVAL
    assert result(gate, grant_dir / "disk.img", os.O_PATH) == EACCES
    gate.close()


def test_refuse_errno_is_configurable(grant_dir: Path) -> None:
    gate = Gate(Policy.from_grants(ro=[grant_dir], refuse_errno=errno.EPERM))
    assert result(gate, "/etc/passwd") == -errno.EPERM
    gate.close()


def test_file_grant_covers_only_that_file(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    gate = Gate(Policy.from_grants(ro=[tmp_path / "a"]))
    assert result(gate, tmp_path / "a") == 0
    assert result(gate, tmp_path / "b") == EACCES
    gate.close()


# --- the attack set -------------------------------------------------------


@pytest.fixture
def attack(tmp_path: Path) -> tuple[Gate, Path, Path]:
    grant = tmp_path / "grant"
    outside = tmp_path / "outside"
    grant.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("secret")
    (grant / "ok").write_text("ok")
    (grant / "sub").mkdir()
    gate = Gate(Policy.from_grants(create=[grant]))
    yield gate, grant, outside
    gate.close()


def test_dotdot_cannot_escape(attack: tuple[Gate, Path, Path]) -> None:
    gate, grant, outside = attack
    assert (outside / "secret").exists()
    assert result(gate, f"{grant}/../outside/secret") == EACCES
    assert result(gate, f"{grant}/sub/../../outside/secret") == EACCES
    assert result(gate, f"{grant}/sub/../ok") == 0  # stays beneath: fine


def test_absolute_symlink_refused(attack: tuple[Gate, Path, Path]) -> None:
    gate, grant, outside = attack
    (grant / "abs").symlink_to(outside / "secret")
    assert result(gate, grant / "abs") == EACCES


def test_relative_symlink_refused(attack: tuple[Gate, Path, Path]) -> None:
    gate, grant, _ = attack
    (grant / "rel").symlink_to("../outside/secret")
    (grant / "inside").symlink_to("ok")
    assert result(gate, grant / "rel") == EACCES
    assert result(gate, grant / "inside") == EACCES  # no symlinks at all by default


def test_symlinks_allowed_stay_beneath(tmp_path: Path) -> None:
    grant = tmp_path / "g"
    grant.mkdir()
    (grant / "ok").write_text("ok")
    (grant / "inside").symlink_to("ok")
    (grant / "out").symlink_to("/etc/passwd")
    gate = Gate(Policy.from_grants(ro=[grant], symlinks=True))
    assert result(gate, grant / "inside") == 0
    assert result(gate, grant / "out") == EACCES
    gate.close()


def test_symlinked_directory_component_refused(attack: tuple[Gate, Path, Path]) -> None:
    gate, grant, outside = attack
    (grant / "dir").symlink_to(outside)
    assert result(gate, grant / "dir" / "secret") == EACCES


def test_proc_magic_links_refused(attack: tuple[Gate, Path, Path]) -> None:
    gate, grant, _ = attack
    (grant / "proc").symlink_to("/proc/self/root")
    assert result(gate, grant / "proc" / "etc" / "passwd") == EACCES
    assert result(gate, "/proc/self/root/etc/passwd") == EACCES


def test_hardlink_refused(attack: tuple[Gate, Path, Path]) -> None:
    gate, grant, outside = attack
    os.link(outside / "secret", grant / "hard")
    assert result(gate, grant / "hard") == EACCES


def test_refused_hardlink_is_not_truncated(tmp_path: Path) -> None:
    grant = tmp_path / "g"
    grant.mkdir()
    (tmp_path / "precious").write_text("keep")
    os.link(tmp_path / "precious", grant / "link")
    gate = Gate(Policy.from_grants(rw=[grant]))
    assert result(gate, grant / "link", os.O_RDWR | os.O_TRUNC) == EACCES
    assert (tmp_path / "precious").read_text() == "keep"
    (grant / "plain").write_text("old")
    assert result(gate, grant / "plain", os.O_RDWR | os.O_TRUNC) == 0
    assert (grant / "plain").read_text() == ""
    gate.close()


def test_devices_and_fifos_refused_without_blocking(attack: tuple[Gate, Path, Path]) -> None:
    gate, grant, _ = attack
    os.mkfifo(grant / "fifo")
    os.mknod(grant / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    assert result(gate, grant / "fifo") == EACCES  # would block forever if opened
    assert result(gate, grant / "null", os.O_RDWR) == EACCES
    assert result(gate, grant / "fifo", os.O_RDWR | os.O_CREAT, 0o644) == EACCES


def test_devices_allowed_by_rule(tmp_path: Path) -> None:
    from testbed.broker.policy import Access, Grant

    os.mkfifo(tmp_path / "fifo")
    gate = Gate(Policy(grants=(Grant(path=str(tmp_path), access=Access.RW, devices=True),)))
    out = gate.handle(req(tmp_path / "fifo", os.O_RDONLY))
    assert out.result == 0 and out.fd is not None
    assert os.get_blocking(out.fd)  # the broker's O_NONBLOCK was taken back off
    os.close(out.fd)
    gate.close()


def _fifo_gate(tmp_path: Path, *, may_block: bool) -> tuple[Gate, Path]:
    from testbed.broker.policy import Access, Grant

    os.mkfifo(tmp_path / "fifo")
    grant = Grant(path=str(tmp_path), access=Access.RW, devices=True)
    return Gate(Policy(grants=(grant,)), may_block=may_block), tmp_path / "fifo"


def test_the_broker_never_waits_for_a_fifos_other_end(tmp_path: Path) -> None:
    gate, fifo = _fifo_gate(tmp_path, may_block=False)
    # O_NONBLOCK, as a single-threaded broker must: a writer with no reader is ENXIO
    assert result(gate, fifo, os.O_WRONLY) == -errno.ENXIO
    gate.close()


def test_a_blocking_gate_opens_a_fifo_as_open2_would(tmp_path: Path) -> None:
    """The supervisor's gate: a writer waits for its reader, then has a working pipe."""
    gate, fifo = _fifo_gate(tmp_path, may_block=True)
    got: dict[str, int | None] = {}
    writer = threading.Thread(target=lambda: got.update(w=gate.handle(req(fifo, os.O_WRONLY)).fd))
    writer.start()
    writer.join(0.3)
    assert writer.is_alive(), "the writer should wait for a reader, as open(2) does"
    reader = os.open(fifo, os.O_RDONLY)
    writer.join(10)
    assert not writer.is_alive()
    w = got["w"]
    assert w is not None
    os.write(w, b"through")
    assert os.get_blocking(w)
    assert os.read(reader, 7) == b"through"
    os.close(w)
    os.close(reader)
    gate.close()


def test_release_blocked_wakes_a_fifo_opener_nobody_will_meet(tmp_path: Path) -> None:
    gate, fifo = _fifo_gate(tmp_path, may_block=True)
    outcomes = []
    opener = threading.Thread(target=lambda: outcomes.append(gate.handle(req(fifo))))
    opener.start()
    deadline = time.monotonic() + 10
    while not gate.release_blocked() and time.monotonic() < deadline:
        time.sleep(0.02)  # until the opener is inside its open
    opener.join(10)
    assert not opener.is_alive() and outcomes[0].result == 0
    assert outcomes[0].fd is not None
    os.close(outcomes[0].fd)
    assert gate.release_blocked() == 0
    gate.close()


def test_create_outside_create_grant(attack: tuple[Gate, Path, Path], tmp_path: Path) -> None:
    gate, _, outside = attack
    assert result(gate, outside / "new", os.O_RDWR | os.O_CREAT, 0o644) == EACCES
    assert not (outside / "new").exists()


def test_trunc_on_read_only_grant(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("keep me")
    gate = Gate(Policy.from_grants(ro=[tmp_path]))
    assert result(gate, tmp_path / "f", os.O_RDONLY | os.O_TRUNC) == EACCES
    assert (tmp_path / "f").read_text() == "keep me"
    gate.close()


def test_symlink_swapped_in_after_check_is_caught(attack: tuple[Gate, Path, Path]) -> None:
    """Race a swapper against the gate: whatever wins, the secret never leaks."""
    gate, grant, outside = attack
    target = grant / "swap"
    target.write_text("fine")
    stop = threading.Event()

    def swapper() -> None:
        tmp_link = grant / "swap.lnk"
        tmp_file = grant / "swap.file"
        while not stop.is_set():
            tmp_link.unlink(missing_ok=True)
            tmp_link.symlink_to(outside / "secret")
            os.replace(tmp_link, target)
            tmp_file.write_text("fine")
            os.replace(tmp_file, target)

    t = threading.Thread(target=swapper)
    t.start()
    try:
        for _ in range(2000):
            out = gate.handle(req(target))
            if out.fd is not None:
                data = os.read(out.fd, 100)
                os.close(out.fd)
                assert data != b"secret"
    finally:
        stop.set()
        t.join()


def test_a_forked_child_reopens_through_its_own_proc_fd(grant_dir: Path) -> None:
    # The gate keeps a dirfd of /proc/self/fd; after a fork it names the
    # parent's descriptors, so the child must open its own.
    gate = Gate(Policy.from_grants(ro=[grant_dir]))
    assert result(gate, grant_dir / "disk.img") == 0  # the parent's dirfd exists now
    pid = os.fork()
    if pid == 0:
        try:
            out = gate.handle(req(grant_dir / "disk.img"))
            ok = out.fd is not None and os.read(out.fd, 100) == b"disk-bytes"
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    gate.close()


@pytest.mark.parametrize("bit", range(32))
def test_any_flag_bit_is_answered_never_raised(grant_dir: Path, bit: int) -> None:
    # flags is a u32 from the peer: bit 31 does not fit a C int, others are
    # undefined; a request must get an answer either way (a raise here ended
    # the broker, found by the hypothesis adversary).
    gate = Gate(Policy.from_grants(create=[grant_dir]))
    try:
        for base in (os.O_RDONLY, os.O_RDWR, os.O_RDWR | os.O_CREAT):
            out = gate.handle(req(grant_dir / "disk.img", base | (1 << bit), 0o644))
            if out.fd is not None:
                os.close(out.fd)
            assert isinstance(out.result, int)
    finally:
        gate.close()
