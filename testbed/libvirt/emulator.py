"""``testbed-emulator``: the ``<emulator>`` libvirt runs instead of QEMU.

libvirt runs its emulator in two ways: capability probes (``-machine none``
and QMP, no ``-name``), which must reach QEMU untouched, and real domains
(``-name guest=NAME,...``).  For a real domain the wrapper connects to the
domain's broker socket (``testbed libvirt serve NAME`` listens there, as
root, with the domain's policy), appends ``-open-hook-fd N`` for the
connected socket and execs the patched QEMU in its own place: same pid, the
``argv[0]`` libvirt chose, every descriptor and the environment libvirt
gave it.  Nothing stays behind as a parent, and the broker serves exactly
this one connection: when QEMU exits or is killed the kernel closes its end
and the broker exits (see :mod:`testbed.libvirt.serve`).

libvirt has already dropped to its QEMU user (``libvirt-qemu``) when it runs
the emulator, so the wrapper has no privilege to lend: the broker must be
started by root, and this module may use only the standard library (it runs
under the system ``python3 -I`` from the world-readable copy that ``testbed
libvirt install`` makes).

No broker socket for the domain means no start: the wrapper prints why and
exits 1, and libvirt shows that line in its error.
"""

from __future__ import annotations

import os
import socket
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
READY = b"+"


class Mode(StrEnum):
    """How a real domain's opens reach the images."""

    #: the patched QEMU with ``-open-hook-fd`` on the domain's broker
    HOOK = "hook"
    #: stock QEMU under ``testbed supervise --landlock`` (not in this tree yet)
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
    pass_fd: int | None = None


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


def connect_broker(path: Path, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except FileNotFoundError:
        sock.close()
        raise EmulatorRefusal(
            f"no broker socket at {path}: start one as root with "
            f"`testbed libvirt serve {path.stem}` (refusing to run QEMU without its broker)"
        ) from None
    except OSError as err:
        sock.close()
        raise EmulatorRefusal(f"cannot connect to the broker at {path}: {err.strerror}") from err
    # Wait for the broker's go-ahead before QEMU replaces us: while we wait,
    # our pid and command line are the wrapper's, for the broker to check.
    try:
        answer = sock.recv(1)
    except OSError as err:
        sock.close()
        raise EmulatorRefusal(f"the broker at {path} did not answer: {err}") from err
    if answer != READY:
        sock.close()
        raise EmulatorRefusal(f"the broker at {path} refused this process (see its log)")
    sock.settimeout(None)
    return sock


def plan(
    argv: Sequence[str],
    *,
    qemu: str,
    mode: Mode,
    run_dir: Path = RUN_DIR,
    connect: bool = True,
) -> Plan:
    """Decide what to exec for ``argv`` (argv[0] first, as libvirt called us)."""
    argv0, args = (argv[0] if argv else qemu), list(argv[1:])
    name = domain_name(args)
    if name is None:
        return Plan(binary=qemu, argv=(argv0, *args), domain=None)
    if mode is Mode.SUPERVISE:
        raise EmulatorRefusal(
            "mode 'supervise' (stock QEMU under `testbed supervise --landlock`) is not "
            "available in this tree yet"
        )
    if any(a in ("-open-hook-fd", "--open-hook-fd") for a in args):
        raise EmulatorRefusal("the command line already has -open-hook-fd")
    path = socket_path(name, run_dir)
    fd = -1
    if connect:
        sock = connect_broker(path)
        fd = sock.detach()
        os.set_inheritable(fd, True)
    firmware = [w for d in FIRMWARE_DIRS for w in ("-L", d)]
    return Plan(
        binary=qemu,
        argv=(argv0, *args, *firmware, "-open-hook-fd", str(fd)),
        domain=name,
        pass_fd=fd if connect else None,
    )


def run(argv: Sequence[str], *, qemu: str, mode: str = "hook", run_dir: Path = RUN_DIR) -> int:
    """Exec QEMU as planned; returns only on refusal (exit status 1)."""
    if mode not in set(Mode):
        print(
            f"testbed-emulator: unknown mode {mode!r} (one of {', '.join(Mode)})", file=sys.stderr
        )
        return 1
    try:
        chosen = plan(argv, qemu=qemu, mode=Mode(mode), run_dir=run_dir)
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
