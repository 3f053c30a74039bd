"""``testbed libvirt serve NAME [--supervise]``: the broker of one libvirt domain, as root.

The wrapper runs as the QEMU user and so cannot start a broker that can
read root's images.  ``serve`` is the privileged half: it listens on
``/run/testbed/libvirt/NAME.sock``, takes the first connection whose peer
(SO_PEERCRED) has the QEMU user's uid and whose command line is the wrapper
of domain NAME, removes the socket, and becomes ``testbed broker --fd N``
with the domain's policy on that one connection.  From then on it lives as
long as that QEMU: when QEMU exits or is killed, its end closes and the
broker exits.  If nobody connects within ``--timeout`` seconds it exits too,
so an aborted ``virsh start`` leaves nothing behind.

With ``--supervise`` the same connection carries the hand-off of
:mod:`testbed.libvirt.supervised` instead: the wrapper installs the seccomp
filter and Landlock it is sent, hands its listener back, and ``serve``
serves stock QEMU's opens under the policy until that QEMU exits.

What the peer check cannot do: every QEMU of this libvirt runs as the same
uid, and a process can rewrite its own command line, so a compromised QEMU
of another domain that races the real one to the socket could get this
domain's grants.  Per-domain DAC users (``<seclabel model='dac'>``) would
close that; the testbed does not set them up.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import select
import socket
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from testbed.broker import Policy
from testbed.broker.server import peer_cred
from testbed.errors import LibvirtError, WaitTimeout
from testbed.libvirt.emulator import READY, RUN_DIR, EmulatorRefusal, domain_name, socket_path

log = logging.getLogger(__name__)

QEMU_USER = "libvirt-qemu"


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    name: str
    policy: Path
    audit: Path | None = None
    qemu_user: str = QEMU_USER
    run_dir: Path = RUN_DIR
    timeout: float = 120.0
    #: serve stock QEMU's opens through seccomp (the wrapper's mode ``supervise``)
    supervise: bool = False
    #: supervise: the system profile beneath the libvirt additions (a built-in name or a file)
    profile: str | Path = "qemu"


def qemu_ids(user: str) -> tuple[int, int]:
    """uid and gid of the QEMU user."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise LibvirtError(
            f"user {user!r} does not exist (libvirt-daemon-system creates it)"
        ) from None
    with contextlib.suppress(KeyError):
        return pw.pw_uid, grp.getgrnam(user).gr_gid
    return pw.pw_uid, pw.pw_gid


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [os.fsdecode(w) for w in raw.split(b"\0") if w]


def peer_problem(sock: socket.socket, name: str, uid: int) -> str:
    """Why this peer may not have domain ``name``'s broker ("" if it may)."""
    cred = peer_cred(sock)
    if cred.uid != uid:
        return f"peer pid {cred.pid} has uid {cred.uid}, not the QEMU user's {uid}"
    try:
        claimed = domain_name(_cmdline(cred.pid))
    except EmulatorRefusal as err:
        return f"peer pid {cred.pid}: {err}"
    if claimed != name:
        return f"peer pid {cred.pid} runs domain {claimed!r}, not {name!r}"
    return ""


def listen(cfg: ServeConfig) -> socket.socket:
    """Bind the domain's socket (replacing a stale one, refusing a live one)."""
    uid, gid = qemu_ids(cfg.qemu_user)
    try:
        path = socket_path(cfg.name, cfg.run_dir)
    except EmulatorRefusal as err:
        raise LibvirtError(str(err)) from err
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(cfg.run_dir, 0o755)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise LibvirtError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            os.unlink(path)  # left by a broker that died
        else:
            raise LibvirtError(f"a broker for domain {cfg.name} is listening at {path} already")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chown(path, 0, gid)
    os.chmod(path, 0o660)
    sock.listen(4)
    log.info("domain %s: listening at %s for uid %d", cfg.name, path, uid)
    return sock


def accept_domain(listener: socket.socket, cfg: ServeConfig) -> socket.socket:
    """The first connection from domain ``cfg.name``'s wrapper; others are closed."""
    uid, _ = qemu_ids(cfg.qemu_user)
    deadline = time.monotonic() + cfg.timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([listener], [], [], left)[0]:
            raise LibvirtError(
                f"domain {cfg.name}: no QEMU connected to its broker"
            ) from WaitTimeout(f"the wrapper of domain {cfg.name} to connect", cfg.timeout)
        conn, _ = listener.accept()
        problem = peer_problem(conn, cfg.name, uid)
        if not problem:
            if not cfg.supervise:
                conn.sendall(READY)  # the wrapper waits for this before it execs QEMU
            return conn
        log.warning("domain %s: refusing a connection: %s", cfg.name, problem)
        conn.close()


def serve(cfg: ServeConfig) -> int:
    """Listen, take the domain's connection, then exec the broker on it (does not return).

    With ``cfg.supervise``: hand the confinement over on that connection and
    serve QEMU's opens here until it exits; returns 0 then.
    """
    policy = Policy.from_toml(cfg.policy)  # a bad policy fails here, before anyone connects
    profile = None
    if cfg.supervise:
        from testbed.libvirt.supervised import libvirt_profile

        profile = libvirt_profile(cfg.profile)  # and so does a bad profile
    uid, _ = qemu_ids(cfg.qemu_user)
    listener = listen(cfg)
    path = Path(listener.getsockname())
    print(f"serving domain {cfg.name} at {path}", flush=True)
    try:
        conn = accept_domain(listener, cfg)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
    if profile is not None:
        from testbed.libvirt.supervised import hand_off, supervise_until_exit

        try:
            handoff = hand_off(
                conn,
                name=cfg.name,
                policy=policy,
                profile=profile,
                audit=cfg.audit,
                qemu_ids=qemu_ids(cfg.qemu_user),
            )
        finally:
            conn.close()
        return supervise_until_exit(handoff)
    fd = conn.detach()
    os.set_inheritable(fd, True)
    argv = [sys.executable, "-m", "testbed", "broker", "--fd", str(fd), "--policy", str(cfg.policy)]
    argv += ["--peer-uid", str(uid)]
    if cfg.audit is not None:
        argv += ["--audit", str(cfg.audit)]
    log.info("domain %s: %s connected; serving with %s", cfg.name, policy.describe(), argv)
    sys.stdout.flush()
    os.execv(sys.executable, argv)
