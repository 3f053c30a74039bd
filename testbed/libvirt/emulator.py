"""``testbed-emulator``: the ``<emulator>`` libvirt runs instead of QEMU.

libvirt runs its emulator in two ways: capability probes (``-machine none``
and QMP, no ``-name``), which must reach QEMU untouched, and real domains
(``-name guest=NAME,...``).  For a real domain the wrapper connects to the
domain's socket (``testbed libvirt serve NAME`` listens there, as root,
with the domain's policy) and execs QEMU in its own place: same pid, the
``argv[0]`` libvirt chose, every descriptor and the environment libvirt
gave it.  Nothing stays behind as a parent.  Two modes:

``hook``
    the patched QEMU with ``-open-hook-fd N`` on the connected socket; the
    broker serves exactly this connection and exits when QEMU's end closes.
``supervise``
    stock QEMU under a seccomp filter and Landlock (``serve --supervise``).
    The serving side sends the BPF program and a Landlock ruleset fd it
    built as root; the wrapper sets no_new_privs, restricts itself to the
    ruleset, installs the filter with ``SECCOMP_FILTER_FLAG_NEW_LISTENER``
    (only the process that installs a filter can get its listener, and
    that is the future QEMU), sends the listener back with SCM_RIGHTS and
    closes its copy, waits until the supervisor says it serves, then execs.
    Every open QEMU makes, from ld.so's first, is a notification the root
    side answers under the domain's policy; the supervisor exits when QEMU
    does (see :mod:`testbed.libvirt.serve`).

libvirt has already dropped to its QEMU user (``libvirt-qemu``) when it runs
the emulator, so the wrapper has no privilege to lend: the broker must be
started by root, and this module may use only the standard library (it runs
under the system ``python3 -I`` from the world-readable copy that ``testbed
libvirt install`` makes).

No broker socket for the domain means no start: the wrapper prints why and
exits 1, and libvirt shows that line in its error.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

#: Where the per-domain broker sockets live (``serve`` makes them).
RUN_DIR = Path("/run/testbed/libvirt")
#: Firmware for real domains: the patched build carries none of its own.
FIRMWARE_DIRS = ("/usr/share/seabios", "/usr/lib/ipxe/qemu", "/usr/share/qemu")
CONNECT_TIMEOUT = 10.0
#: ``serve`` sends this byte once it has checked the peer; hook frames follow.
#: In supervise mode it is the last byte: the supervisor serves the listener.
READY = b"+"
#: ``serve --supervise`` sends this byte once it has checked the peer: "which binary?".
SUPERVISE = b"S"
#: The supervisor's confinement: PLAN, u32 length, the BPF program; the ruleset fd rides along.
PLAN = b"P"
#: The wrapper's listener rides with this byte.
LISTENER = b"L"
#: The supervisor refuses; a reason in text follows, then EOF.
REFUSED = b"-"
#: Largest seccomp program (BPF_MAXINSNS instructions of 8 bytes).
MAX_PROGRAM = 4096 * 8

# x86_64 system calls and flags the wrapper needs to confine itself.  The
# values are testbed.supervise's (a test checks they agree); they are
# repeated here because this file imports only the standard library.
SYS_SECCOMP = 317
SYS_LANDLOCK_RESTRICT_SELF = 446
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5
PR_SET_NO_NEW_PRIVS = 38


class Mode(StrEnum):
    """How a real domain's opens reach the images."""

    #: the patched QEMU with ``-open-hook-fd`` on the domain's broker
    HOOK = "hook"
    #: stock QEMU under the domain's seccomp supervisor, confined by Landlock
    SUPERVISE = "supervise"


# Not in testbed/errors.py on purpose: this file runs as libvirt's emulator, as an
# unprivileged user without the venv, so it imports the standard library only.
class EmulatorRefusal(Exception):
    """The wrapper will not start QEMU; the message says why (it goes to libvirt)."""


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What the wrapper will exec: the binary and the whole argv (``argv[0]`` kept)."""

    binary: str
    argv: tuple[str, ...]
    domain: str | None
    #: hook mode: the broker socket QEMU inherits (its number is in argv)
    pass_fd: int | None = None
    #: supervise mode: the supervisor's socket, to confine this process on before exec
    supervisor_fd: int | None = None


def domain_name(args: Sequence[str]) -> str | None:
    """The domain's name from ``-name guest=NAME,...`` (or ``-name NAME``), None for a probe.

    QEMU's option syntax doubles a literal comma (``,,``).
    """
    for i, arg in enumerate(args):
        if arg in ("-name", "--name"):
            if i + 1 >= len(args):
                raise EmulatorRefusal("-name without a value")
            return _name_value(args[i + 1])
    return None


def _name_value(value: str) -> str:
    parts: list[str] = []
    current = ""
    i = 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                current += ","
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += value[i]
        i += 1
    parts.append(current)
    for part in parts:
        if part.startswith("guest="):
            return part[len("guest=") :]
    if parts and "=" not in parts[0]:
        return parts[0]
    raise EmulatorRefusal(f"-name {value!r} names no guest")


def socket_path(name: str, run_dir: Path = RUN_DIR) -> Path:
    """The broker socket of domain ``name``; refuses names that could leave ``run_dir``."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise EmulatorRefusal(f"domain name {name!r} cannot name a broker socket")
    path = run_dir / f"{name}.sock"
    if len(os.fsencode(path)) > 107:
        raise EmulatorRefusal(f"broker socket path {path} is longer than 107 bytes")
    return path


def _serve_hint(name: str, mode: Mode) -> str:
    flag = " --supervise" if mode is Mode.SUPERVISE else ""
    return f"`testbed libvirt serve {name}{flag}`"


def connect_broker(
    path: Path, timeout: float = CONNECT_TIMEOUT, *, mode: Mode = Mode.HOOK
) -> socket.socket:
    """Connect to the domain's socket and wait for its first byte (the peer check passed).

    ``mode`` says which server this wrapper needs: a hook broker answers
    :data:`READY`, a supervisor :data:`SUPERVISE`; the other one is a refusal
    that names the mismatch.
    """
    what = "supervisor" if mode is Mode.SUPERVISE else "broker"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except FileNotFoundError:
        sock.close()
        raise EmulatorRefusal(
            f"no {what} socket at {path}: start one as root with "
            f"{_serve_hint(path.stem, mode)} (refusing to run QEMU without its {what})"
        ) from None
    except OSError as err:
        sock.close()
        raise EmulatorRefusal(f"cannot connect to the {what} at {path}: {err.strerror}") from err
    # Wait for the go-ahead before QEMU replaces us: while we wait, our pid
    # and command line are the wrapper's, for the serving side to check.
    try:
        answer = sock.recv(1)
    except OSError as err:
        sock.close()
        raise EmulatorRefusal(f"the {what} at {path} did not answer: {err}") from err
    want = SUPERVISE if mode is Mode.SUPERVISE else READY
    if answer != want:
        sock.close()
        if answer in (READY, SUPERVISE):
            theirs = "a supervisor (serve --supervise)" if answer == SUPERVISE else "a hook broker"
            raise EmulatorRefusal(
                f"{path} is served by {theirs}, but this wrapper is mode {mode.value!r}: "
                f"start {_serve_hint(path.stem, mode)} instead"
            )
        raise EmulatorRefusal(f"the {what} at {path} refused this process (see its log)")
    sock.settimeout(None if mode is Mode.HOOK else timeout)
    return sock


def plan(
    argv: Sequence[str],
    *,
    qemu: str,
    mode: Mode,
    run_dir: Path = RUN_DIR,
    connect: bool = True,
) -> Plan:
    """Decide what to exec for ``argv`` (argv[0] first, as libvirt called us).

    With ``connect``, a real domain's socket is connected and its first byte
    checked; nothing irreversible happens here (the confinement of the
    supervise mode is :func:`confine`, called by :func:`run` right before exec).
    """
    argv0, args = (argv[0] if argv else qemu), list(argv[1:])
    name = domain_name(args)
    if name is None:
        return Plan(binary=qemu, argv=(argv0, *args), domain=None)
    if any(a in ("-open-hook-fd", "--open-hook-fd") for a in args):
        raise EmulatorRefusal("the command line already has -open-hook-fd")
    path = socket_path(name, run_dir)
    firmware = tuple(w for d in FIRMWARE_DIRS for w in ("-L", d))
    if mode is Mode.SUPERVISE:
        sock_fd = connect_broker(path, mode=mode).detach() if connect else None
        return Plan(binary=qemu, argv=(argv0, *args, *firmware), domain=name, supervisor_fd=sock_fd)
    fd = -1
    if connect:
        sock = connect_broker(path)
        fd = sock.detach()
        os.set_inheritable(fd, True)
    return Plan(
        binary=qemu,
        argv=(argv0, *args, *firmware, "-open-hook-fd", str(fd)),
        domain=name,
        pass_fd=fd if connect else None,
    )


def _recv_exact(sock: socket.socket, count: int, what: str) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise EmulatorRefusal(f"the supervisor closed the socket in the middle of {what}")
        data += chunk
    return data


def _receive_plan(sock: socket.socket) -> tuple[bytes, int]:
    """The BPF program and the Landlock ruleset fd the supervisor sent (or its refusal)."""
    head, ancdata, _flags, _addr = sock.recvmsg(
        5, socket.CMSG_SPACE(4 * 4), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += struct.unpack(f"={len(data) // 4}i", data[: len(data) // 4 * 4])
    try:
        if head[:1] == REFUSED:
            rest = head[1:]
            while len(rest) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                rest += chunk
            raise EmulatorRefusal(
                f"the supervisor refused: {rest.decode(errors='replace').strip()}"
            )
        if head[:1] != PLAN or len(fds) != 1:
            raise EmulatorRefusal(
                f"the supervisor sent {head[:1]!r} with {len(fds)} fds, not its plan"
            )
        head += _recv_exact(sock, 5 - len(head), "the plan's header")
        (length,) = struct.unpack("=I", head[1:5])
        if length == 0 or length % 8 or length > MAX_PROGRAM:
            raise EmulatorRefusal(f"the supervisor's BPF program has {length} bytes")
        return _recv_exact(sock, length, "the BPF program"), fds[0]
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def _confine_self(program: bytes, ruleset_fd: int) -> int:
    """no_new_privs, Landlock, then the filter; returns the listener fd."""
    libc = ctypes.CDLL(None, use_errno=True)

    def check(ret: int, what: str) -> int:
        if ret < 0:
            code = ctypes.get_errno()
            raise EmulatorRefusal(f"{what}: {os.strerror(code)}")
        return ret

    ul = ctypes.c_ulong
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, ul(1), ul(0), ul(0), ul(0)), "prctl(PR_SET_NO_NEW_PRIVS)")
    check(
        libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_long(ruleset_fd), ul(0)),
        "landlock_restrict_self",
    )
    os.close(ruleset_fd)
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    return check(
        libc.syscall(
            ctypes.c_long(SYS_SECCOMP), ul(SECCOMP_SET_MODE_FILTER), ul(flags), ctypes.byref(prog)
        ),
        "seccomp(SECCOMP_SET_MODE_FILTER, NEW_LISTENER | WAIT_KILLABLE_RECV)",
    )


def confine(sock_fd: int, binary: str) -> None:
    """Supervise mode, right before exec: get confined and hand the listener over.

    1. send the path of the binary we will exec (Landlock must let us run it);
    2. receive the supervisor's BPF program and Landlock ruleset fd;
    3. ``prctl(PR_SET_NO_NEW_PRIVS)``, ``landlock_restrict_self``, then the
       filter with ``NEW_LISTENER | WAIT_KILLABLE_RECV``;
    4. send the listener (SCM_RIGHTS) and close our copy: a process that kept
       its own listener could answer its own opens;
    5. wait for :data:`READY`: the supervisor serves the listener now.

    From step 3 on, every open this process makes waits for the supervisor,
    so nothing between 3 and 5 opens a file (the modules and libc are loaded
    already; the fds travel with ``sendmsg``, not ``socket.send_fds``).
    """
    sock = socket.socket(fileno=sock_fd)
    try:
        sock.settimeout(CONNECT_TIMEOUT)  # waits use poll(2): nothing opened
        sock.sendall(os.fsencode(binary) + b"\n")
        program, ruleset_fd = _receive_plan(sock)
        listener = _confine_self(program, ruleset_fd)
        try:
            sock.sendmsg(
                [LISTENER], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("=i", listener))]
            )
        finally:
            os.close(listener)
        if sock.recv(1) != READY:
            raise EmulatorRefusal("the supervisor did not take the listener (see its log)")
    except OSError as err:
        raise EmulatorRefusal(f"handing the listener to the supervisor failed: {err}") from err
    finally:
        sock.close()


def run(argv: Sequence[str], *, qemu: str, mode: str = "hook", run_dir: Path = RUN_DIR) -> int:
    """Exec QEMU as planned; returns only on refusal (exit status 1)."""
    if mode not in set(Mode):
        print(
            f"testbed-emulator: unknown mode {mode!r} (one of {', '.join(Mode)})", file=sys.stderr
        )
        return 1
    try:
        chosen = plan(argv, qemu=qemu, mode=Mode(mode), run_dir=run_dir)
        if chosen.supervisor_fd is not None:
            confine(chosen.supervisor_fd, chosen.binary)
        os.execv(chosen.binary, list(chosen.argv))
    except EmulatorRefusal as err:
        print(f"testbed-emulator: {err}", file=sys.stderr)
    except (ValueError, OSError) as err:
        print(f"testbed-emulator: cannot run {qemu}: {err}", file=sys.stderr)
    return 1


def main() -> int:
    """Console script: QEMU and mode from ``TESTBED_EMULATOR_QEMU`` / ``_MODE``.

    The copies ``testbed libvirt install`` writes bake both in instead,
    because libvirt gives its emulator a clean environment.
    """
    qemu = os.environ.get("TESTBED_EMULATOR_QEMU")
    if not qemu:
        print(
            "testbed-emulator: set TESTBED_EMULATOR_QEMU to the patched QEMU, or use a "
            "wrapper made by `testbed libvirt install`",
            file=sys.stderr,
        )
        return 2
    return run(sys.argv, qemu=qemu, mode=os.environ.get("TESTBED_EMULATOR_MODE", "hook"))
