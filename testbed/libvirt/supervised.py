"""``testbed libvirt serve NAME --supervise``: stock QEMU's opens, served as root.

libvirt drops to ``libvirt-qemu`` before it runs the ``<emulator>``, and a
seccomp listener can be had only by the process that installs the filter:
the future QEMU.  So the hand-off goes over the domain's socket, after the
peer check of :mod:`testbed.libvirt.serve`:

1. serve sends :data:`~testbed.libvirt.emulator.SUPERVISE`; the wrapper
   answers with the path of the binary it will exec (one line);
2. serve builds, as root, the BPF program and a Landlock ruleset (the
   system profile, execute on that binary and its ELF interpreter, nothing
   on the images) and sends both (the ruleset as an fd);
3. the wrapper sets no_new_privs, restricts itself, installs the filter
   with ``NEW_LISTENER | WAIT_KILLABLE_RECV``, sends the listener back and
   closes its copy;
4. serve starts serving the listener under the domain's policy, sends
   :data:`~testbed.libvirt.emulator.READY`, and the wrapper execs QEMU.

The wrapper never builds anything: it runs three system calls on what it
got, with the standard library.  serve then lives exactly as long as QEMU:
it holds a pidfd of the peer (the wrapper's pid is QEMU's after the exec)
and stops when it fires, or earlier when nothing is left under the filter.
A wrapper that dies before step 4 closes the socket, and serve exits.

Besides the domain's policy file, each domain gets one grant computed per
start: libvirt's master key for this run
(``/var/lib/libvirt/qemu/domain-ID-NAME/master-key.aes``, read-only, named in
QEMU's command line; the ID changes with each start).  The system profile
is ``qemu`` plus ``/dev/ptmx`` (the serial console's pty).

One thing open(2) does that a root supervisor's open does not: a pty master
opened by QEMU itself gets a slave owned by QEMU's user.  Opened by root,
the slave is root's (mode 0600 here), QEMU's ``TIOCGPTPEER`` fails, glibc
falls back to opening ``/dev/pts/N`` by name, and granting ``/dev/pts``
would hand QEMU every terminal on the host.  :class:`LibvirtDecider` gives
the new slave to the QEMU user instead, as a grantpt of old did.  QEMU then
gets the slave with ``TIOCGPTPEER``: an open the kernel does for it, out of
seccomp's sight but not Landlock's, so the ruleset (not the supervisor's
policy) has a rule for ``/dev/pts``; DAC keeps every other user's terminal
out of reach (the slaves are 0600, their owners').
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import re
import select
import socket
import stat
import struct
import tomllib
from importlib import resources
from pathlib import Path

from testbed.broker import Access, Grant, Outcome, Policy
from testbed.broker.server import peer_cred
from testbed.errors import LibvirtError, TestbedError, TransportError, WaitTimeout
from testbed.libvirt.emulator import LISTENER, PLAN, READY, REFUSED, SUPERVISE
from testbed.supervise import landlock as ll
from testbed.supervise.decide import Decider
from testbed.supervise.handoff import ServedListener, confinement
from testbed.supervise.profile import SystemProfile, load_profile, profile_from_mapping
from testbed.transport import close_fds, recv_with_fds

log = logging.getLogger(__name__)

#: How long each step of the hand-off may take (the wrapper is waiting on us, and we on it).
HANDOFF_TIMEOUT = 30.0
#: libvirt's per-domain directories (``domain-ID-SHORTNAME``), where the master key is.
LIBVIRT_QEMU_DIR = "/var/lib/libvirt/qemu"
#: libvirt truncates the name in ``domain-ID-NAME`` to this many characters.
SHORT_NAME_MAX = 20

#: What a QEMU started by libvirt opens besides what the ``qemu`` profile lists.
LIBVIRT_PROFILE_EXTRA = """\
# -chardev pty (libvirt's serial console): QEMU opens /dev/ptmx and gets the
# slave with TIOCGPTPEER, so /dev/pts itself needs no grant.
[[grant]]
path = "/dev/ptmx"
access = "rw"
devices = true
"""


#: ``/dev/ptmx`` (char 5:2) and ``TIOCGPTN`` (``_IOR('T', 0x30, unsigned int)``).
PTMX_RDEV = os.makedev(5, 2)
TIOCGPTN = 0x80045430
#: Where the slaves of masters opened through /dev/ptmx appear (the same devpts:
#: ptmx finds it as ``pts`` next to itself, in the supervisor's mount namespace).
DEVPTS = Path("/dev/pts")
#: Landlock only (see the module docstring): QEMU's own TIOCGPTPEER open of its slave.
PTY_RULE = (str(DEVPTS), ll.FS.READ_FILE | ll.FS.WRITE_FILE | ll.FS.IOCTL_DEV)


class LibvirtDecider(Decider):
    """The supervisor's decisions, plus: a pty slave opened for QEMU belongs to QEMU's user."""

    def __init__(
        self, policy: Policy, profile: SystemProfile | None, *, uid: int, gid: int
    ) -> None:
        super().__init__(policy, profile)
        self.uid = uid
        self.gid = gid

    def decide(self, path: str, flags: int, mode: int, *, tgid: int) -> tuple[Outcome, str]:
        outcome, part = super().decide(path, flags, mode, tgid=tgid)
        if outcome.result == 0 and outcome.fd is not None:
            st = os.fstat(outcome.fd)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == PTMX_RDEV:
                self._give_slave(outcome.fd)
        return outcome, part

    def _give_slave(self, master: int) -> None:
        # By number: TIOCGPTPEER would give the slave's fd, but the slave stays
        # locked (EIO) until QEMU's unlockpt.  The number is ours while the
        # master is open, so the name cannot change under us.
        (number,) = struct.unpack("=I", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))
        os.chown(DEVPTS / str(number), self.uid, self.gid, follow_symlinks=False)


def libvirt_profile(base: str | Path = "qemu") -> SystemProfile:
    """System profile ``base`` (a built-in name or a file) plus :data:`LIBVIRT_PROFILE_EXTRA`."""
    text_name = str(base)
    if isinstance(base, Path) or "/" in text_name or text_name.endswith(".toml"):
        raw = Path(base).read_text()
    else:
        load_profile(text_name)  # names the known profiles if there is no such one
        raw = (resources.files("testbed.supervise") / "profiles" / f"{text_name}.toml").read_text()
    data = tomllib.loads(raw)
    extra = tomllib.loads(LIBVIRT_PROFILE_EXTRA)
    data["grant"] = [*data.get("grant", []), *extra["grant"]]
    return profile_from_mapping(data, name=f"{Path(text_name).stem}+libvirt", source=text_name)


def master_key_grants(cmdline: list[str], name: str) -> tuple[Grant, ...]:
    """A read-only grant for the master key this start of domain ``name`` was given.

    The key's path is in QEMU's command line (``-object secret,...,file=``);
    only a file directly in ``LIBVIRT_QEMU_DIR/domain-ID-NAME`` counts.
    """
    short = re.escape(name[:SHORT_NAME_MAX])
    pattern = re.compile(rf"{re.escape(LIBVIRT_QEMU_DIR)}/domain-\d+-{short}/master-key\.aes")
    found = {m.group(0) for word in cmdline for m in pattern.finditer(word)}
    return tuple(Grant(path=p, access=Access.RO) for p in sorted(found))


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError as err:
        raise LibvirtError(f"cannot read the command line of pid {pid}: {err}") from err
    return [os.fsdecode(w) for w in raw.split(b"\0") if w]


def _read_line(conn: socket.socket, limit: int = 4096) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(limit - len(data))
        if not chunk:
            raise LibvirtError("the wrapper closed its socket during the hand-off")
        data += chunk
        if len(data) >= limit:
            raise LibvirtError(f"the wrapper sent more than {limit} bytes without a newline")
    return data[:-1]


def _receive_listener(conn: socket.socket) -> int:
    try:
        msg, fds = recv_with_fds(conn, 16)
    except TransportError as err:
        raise LibvirtError(f"receiving the wrapper's listener failed: {err}") from err
    if msg != LISTENER or len(fds) != 1:
        close_fds(fds)
        if not msg:
            raise LibvirtError("the wrapper closed its socket instead of sending its listener")
        raise LibvirtError(f"the wrapper sent {msg[:40]!r} with {len(fds)} fds, not its listener")
    return fds[0]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Handoff:
    """What :func:`hand_off` set up: the serving side and the pidfd of the process it serves."""

    served: ServedListener
    pid: int
    pidfd: int
    binary: str


def _send_plan(
    conn: socket.socket, *, name: str, pid: int, profile: SystemProfile
) -> tuple[str, tuple[Grant, ...]]:
    """Steps 1 and 2: the binary asked for, and the master-key grant for this start."""
    try:
        conn.sendall(SUPERVISE)
        binary = os.fsdecode(_read_line(conn))
        keys = master_key_grants(_cmdline(pid), name)
        program, ruleset = confinement(
            pid=pid, binary=binary, profile=profile, extra_rules=[PTY_RULE]
        )
    except (TestbedError, OSError) as err:
        with contextlib.suppress(OSError):
            conn.sendall(REFUSED + str(err).encode(errors="replace")[:4000])
        raise LibvirtError(f"domain {name}: cannot confine pid {pid}: {err}") from err
    try:
        header = PLAN + struct.pack("=I", len(program))
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("=i", ruleset.fd))]
        conn.sendmsg([header + program], rights)
    finally:
        ruleset.close()
    return binary, keys


def hand_off(
    conn: socket.socket,
    *,
    name: str,
    policy: Policy,
    profile: SystemProfile,
    audit: Path | None,
    qemu_ids: tuple[int, int],
) -> Handoff:
    """Steps 1 to 4 of the module docstring on an accepted, checked connection.

    Any failure is sent to the wrapper as a refusal (it shows it to libvirt)
    while the wrapper still listens, and raised as :class:`LibvirtError`.
    """
    cred = peer_cred(conn)
    pidfd = os.pidfd_open(cred.pid)
    conn.settimeout(HANDOFF_TIMEOUT)
    try:
        binary, keys = _send_plan(conn, name=name, pid=cred.pid, profile=profile)
        listener = _receive_listener(conn)
        grants = policy.grants + tuple(g for g in keys if g not in policy.grants)
        domain_policy = dataclasses.replace(policy, grants=grants)
        uid, gid = qemu_ids
        served = ServedListener(
            listener,
            domain_policy,
            profile=profile,
            audit_path=audit,
            decider=LibvirtDecider(domain_policy, profile, uid=uid, gid=gid),
        )
        conn.sendall(READY)  # the wrapper execs QEMU on this
    except TimeoutError as err:
        os.close(pidfd)
        raise WaitTimeout(
            f"the wrapper of domain {name} (pid {cred.pid}) during the hand-off", HANDOFF_TIMEOUT
        ) from err
    except BaseException:
        os.close(pidfd)
        raise
    log.info(
        "domain %s: pid %d is under the filter and Landlock (%s); serving its opens%s",
        name,
        cred.pid,
        binary,
        "".join(f"; + {g.path} (ro)" for g in keys),
    )
    return Handoff(served=served, pid=cred.pid, pidfd=pidfd, binary=binary)


def supervise_until_exit(handoff: Handoff, *, poll: float = 1.0) -> int:
    """Serve until the QEMU exits (its pidfd fires) or nothing is left under the filter."""
    try:
        while True:
            ready, _, _ = select.select([handoff.pidfd], [], [], poll)
            if ready:
                log.info("pid %d exited: serving ends", handoff.pid)
                break
            if handoff.served.join(0):
                log.info("nothing is left under pid %d's filter: serving ends", handoff.pid)
                break
    finally:
        handoff.served.close()
        os.close(handoff.pidfd)
    return 0


__all__ = ["Handoff", "hand_off", "libvirt_profile", "master_key_grants", "supervise_until_exit"]
