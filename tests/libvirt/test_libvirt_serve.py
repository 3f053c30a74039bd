"""The per-domain broker: which peer gets it, the go-ahead byte, one connection only.

The peer here is a child process whose command line carries
``-name guest=NAME`` (as the wrapper's does); the "QEMU user" is root,
which the test runs as.
"""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.errors import LibvirtError
from testbed.libvirt.serve import ServeConfig, accept_domain, listen, peer_problem

ME = getpass.getuser()

# Connects, prints the byte it got (or "closed"), then waits to be killed.
CLIENT = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
b = s.recv(1)
print(b.decode() if b else "closed", flush=True)
time.sleep(30)
"""


def cfg(tmp_path: Path, name: str = "vm1", **kw: object) -> ServeConfig:
    policy = tmp_path / "p.toml"
    policy.write_text("")
    base: dict[str, object] = {
        "name": name,
        "policy": policy,
        "qemu_user": ME,
        "run_dir": tmp_path / "run",
        "timeout": 10.0,
    }
    base.update(kw)
    return ServeConfig(**base)  # type: ignore[arg-type]


def client(path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(path), *args], stdout=subprocess.PIPE, text=True
    )


def test_only_the_domains_own_wrapper_gets_the_go_ahead(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    listener = listen(c)
    path = Path(listener.getsockname())
    other = client(path, "-name", "guest=vm2")  # another domain's process, same uid
    assert other.stdout is not None
    time.sleep(0.5)
    mine = client(path, "-name", "guest=vm1,debug-threads=on")
    assert mine.stdout is not None
    try:
        conn = accept_domain(listener, c)
        assert other.stdout.readline().strip() == "closed"
        assert mine.stdout.readline().strip() == "+"
        conn.close()
    finally:
        listener.close()
        for p in (other, mine):
            p.kill()
            p.wait()


def test_a_peer_of_another_uid_is_refused(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    try:
        assert "not the QEMU user's" in peer_problem(a, "vm1", uid=12345)
        # right uid, but this process (pytest) is not domain vm1's wrapper:
        assert "runs domain None" in peer_problem(a, "vm1", uid=os.getuid())
    finally:
        a.close()
        b.close()


def test_nobody_connecting_ends_the_broker(tmp_path: Path) -> None:
    c = cfg(tmp_path, timeout=0.3)
    listener = listen(c)
    try:
        with pytest.raises(LibvirtError, match="no QEMU connected"):
            accept_domain(listener, c)
    finally:
        listener.close()


def test_a_live_broker_socket_is_not_replaced_but_a_stale_one_is(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    first = listen(c)
    with pytest.raises(LibvirtError, match="listening"):
        listen(c)
    first.close()  # the socket file stays, nobody listens: stale
    second = listen(c)
    second.close()


def test_an_unknown_qemu_user_is_named(tmp_path: Path) -> None:
    with pytest.raises(LibvirtError, match="no-such-user"):
        listen(cfg(tmp_path, qemu_user="no-such-user"))
