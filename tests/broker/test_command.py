"""``testbed broker`` as a process: --socket, --fd, signals, bad arguments."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.transport import HookClient

BROKER = [sys.executable, "-m", "testbed", "broker"]


def wait_for_path(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for the broker's socket {path}")
        time.sleep(0.02)


def test_help_documents_every_option() -> None:
    out = subprocess.run([*BROKER, "--help"], capture_output=True, text=True, check=True).stdout
    for opt in (
        "--socket",
        "--fd",
        "--allow-ro",
        "--allow-rw",
        "--allow-create",
        "--policy",
        "--audit",
        "--refuse-errno",
        "--peer-uid",
        "--peer-pid",
        "--allow-symlinks",
        "--allow-directories",
        "--allow-devices",
        "--poll-us",
    ):
        assert opt in out
    assert "audit log" in out and "openat2" in out


def test_socket_mode_and_sigterm(tmp_path: Path) -> None:
    (tmp_path / "disk").write_text("data")
    sock_path = tmp_path / "b.sock"
    audit = tmp_path / "audit.jsonl"
    proc = subprocess.Popen(
        [*BROKER, "--socket", str(sock_path), "--allow-ro", str(tmp_path), "--audit", str(audit)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_path(sock_path)
        for _ in range(2):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(sock_path))
            with HookClient(s) as c:
                fd = c.open(str(tmp_path / "disk"), os.O_RDONLY)
                assert os.read(fd, 4) == b"data"
                os.close(fd)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert not sock_path.exists()
    assert len(audit.read_text().splitlines()) == 2
    assert json.loads(audit.read_text().splitlines()[0])["result"] == 0


def test_fd_mode_exits_when_the_peer_closes(tmp_path: Path) -> None:
    (tmp_path / "disk").write_text("data")
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [*BROKER, "--fd", str(theirs.fileno()), "--allow-ro", str(tmp_path)],
        pass_fds=[theirs.fileno()],
        stderr=subprocess.PIPE,
        text=True,
    )
    theirs.close()
    client = HookClient(ours)
    os.close(client.open(str(tmp_path / "disk"), os.O_RDONLY))
    client.close()
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fd", "97"], "--fd 97: not an open descriptor"),
        (["--socket", "/tmp/x" + "y" * 120], "107-byte limit"),
        (["--socket", "/tmp/tb.sock", "--allow-ro", "relative"], "must be absolute"),
        (["--socket", "/tmp/tb.sock", "--refuse-errno", "EWHAT"], "not an errno"),
        (["--socket", "/tmp/tb.sock", "--policy", "/nonexistent.toml"], "cannot read policy"),
        (["--socket", "/tmp/tb.sock", "--poll-us", "-5"], "'-5': a whole number of microseconds"),
        (["--socket", "/tmp/tb.sock", "--poll-us", "soon"], "'soon': a whole number"),
    ],
)
def test_bad_arguments_are_clear_errors(args: list[str], message: str) -> None:
    out = subprocess.run([*BROKER, *args], capture_output=True, text=True, timeout=20)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_fd_that_is_not_a_socket(tmp_path: Path) -> None:
    r, w = os.pipe()
    out = subprocess.run(
        [*BROKER, "--fd", str(r)], pass_fds=[r], capture_output=True, text=True, timeout=20
    )
    os.close(r)
    os.close(w)
    assert out.returncode == 2 and "not a socket" in out.stderr


def test_policy_file_and_flags_add_up(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "disk").write_text(d.name)
    policy = tmp_path / "policy.toml"
    policy.write_text(f'refuse_errno = "EPERM"\n[[grant]]\npath = "{b}"\naccess = "rw"\n')
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [*BROKER, "--fd", str(theirs.fileno()), "--allow-ro", str(a), "--policy", str(policy)],
        pass_fds=[theirs.fileno()],
        stderr=subprocess.PIPE,
        text=True,
    )
    theirs.close()
    client = HookClient(ours)
    for path, flags in ((a / "disk", os.O_RDONLY), (b / "disk", os.O_RDWR)):
        fd = client.open(str(path), flags)
        assert os.read(fd, 1) == path.parent.name.encode()
        os.close(fd)
    with pytest.raises(PermissionError) as info:  # EPERM from the file's refuse_errno
        client.open(str(a / "disk"), os.O_RDWR)
    assert info.value.errno == 1
    client.close()
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert f"ro     {a}" in err and f"rw     {b}" in err  # the grants it serves, on startup


def test_serving_imports_only_what_serving_needs(tmp_path: Path) -> None:
    """A hooked QEMU's first open waits for the broker's imports (issue 17): none to spare."""
    (tmp_path / "disk.img").write_bytes(b"x")
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", *BROKER[1:], "--fd", str(theirs.fileno()),
         "--allow-ro", str(tmp_path)],
        pass_fds=[theirs.fileno()], stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    theirs.close()
    with HookClient(ours, timeout=10) as client:
        os.close(client.open(str(tmp_path / "disk.img"), os.O_RDONLY))
    _, err = proc.communicate(timeout=30)
    imported = {
        line.split("|")[-1].strip() for line in err.splitlines() if line.startswith("import time:")
    }
    assert "testbed.broker.server" in imported  # the measurement saw the broker's imports
    # json only for an audit file, tomllib only for --policy, no other part of the testbed
    unneeded = {"json", "tomllib", "testbed.qemu", "testbed.block", "testbed.bench",
                "testbed.compare", "testbed.guest", "testbed.supervise"}  # fmt: skip
    assert imported & unneeded == set()
