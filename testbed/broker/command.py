"""``testbed broker``: run the broker from the command line."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import sys
from types import FrameType
from typing import Any

from testbed.broker.policy import Policy, parse_errno
from testbed.broker.server import Broker, listen_unix
from testbed.errors import PolicyError, TransportError

log = logging.getLogger("testbed.broker")

DESCRIPTION = """\
Serve -open-hook-fd requests: open files on behalf of a (confined) QEMU and
pass the descriptors back with SCM_RIGHTS, or answer -errno.

Give exactly one of --socket (listen for any number of clients) or --fd (serve
one inherited, connected socket: the broker's end of the socketpair whose
other end QEMU got as -open-hook-fd; the broker exits when QEMU closes it).

Policy: every open must fall under a grant.  A directory grants everything
beneath it.  The broker decides on the inode before it opens anything for
reading or writing: the path is resolved with openat2(O_PATH, RESOLVE_BENEATH |
RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV) from the
grant's root, so '..', symlinks, mount points and /proc tricks cannot leave
it; the inode is checked (directories, device nodes, FIFOs, sockets and files
with several hard links are refused unless a --policy rule allows them) and
only then opened, through /proc/self/fd, with the peer's flags.  Writing
(O_WRONLY, O_RDWR, O_TRUNC, O_APPEND) needs --allow-rw or --allow-create;
O_CREAT needs --allow-create, and the created file's mode is masked (no
setuid/setgid, not world-writable).  A refusal answers -EACCES (see
--refuse-errno) and the connection stays usable; a request whose audit record
cannot be written is answered -EIO.
"""

EPILOG = """\
policy file (TOML), merged with the flags:
  refuse_errno = "EACCES"
  peer_uid = 107
  [[grant]]
  path = "/srv/images"
  access = "create"        # ro | rw | create
  symlinks = false         # follow symlinks whose every hop stays beneath a grant
  devices = false          # allow device nodes, FIFOs, sockets
  hardlinks = false        # allow files with more than one link
  directories = false      # hand out directory fds (openat(fd, "..") leaves the grant)
  cross_mounts = false     # follow paths across mount points inside the grant

audit log: one JSON object per request, in arrival order, written before the
reply, with time, conn, peer_pid, path, flags (as on the wire), flag_names,
mode, result (0 or -errno), latency_us, reason (why a request was refused)
and via ("hook"); a name that is not UTF-8 also has path_hex (its bytes).

examples:
  testbed broker --socket /run/hook.sock --allow-ro /srv/base --allow-create /srv/vm1
  testbed broker --fd 3 --allow-rw /srv/vm1 --audit vm1.jsonl 3<>/dev/null  # fd from the parent
"""


#: what a peer's next open in a burst usually takes to come (docs/broker.md)
DEFAULT_POLL_US = 100


def _microseconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of microseconds, 0 or more")
    return value


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "broker",
        help="serve -open-hook-fd requests under an access policy",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH", help="listen on a UNIX socket at PATH")
    where.add_argument(
        "--fd", type=int, metavar="N", help="serve the connected UNIX socket inherited as fd N"
    )
    _policy_arguments(p)
    p.add_argument("--audit", metavar="FILE", help="append one JSON line per request to FILE")
    p.add_argument(
        "--poll-us",
        type=_microseconds,
        default=DEFAULT_POLL_US,
        metavar="US",
        help=(
            "after answering, poll this many microseconds for the next request before "
            f"sleeping (default {DEFAULT_POLL_US}; 0: never): a peer's opens come in bursts, "
            "and waking a sleeping vCPU costs more than an open; off while the broker is "
            "pinned to one CPU"
        ),
    )
    p.set_defaults(func=run)


def _policy_arguments(p: argparse.ArgumentParser) -> None:
    """The options that make the policy: grants, rules, refusals, peers."""
    p.add_argument(
        "--allow-ro",
        action="append",
        default=[],
        metavar="PATH",
        help="grant read-only opens of PATH (a file, or everything beneath a directory)",
    )
    p.add_argument(
        "--allow-rw",
        action="append",
        default=[],
        metavar="PATH",
        help="grant read-write opens of PATH (no creating files)",
    )
    p.add_argument(
        "--allow-create",
        action="append",
        default=[],
        metavar="DIR",
        help="grant read-write opens and O_CREAT beneath DIR",
    )
    p.add_argument(
        "--allow-symlinks",
        action="store_true",
        help="follow symlinks whose every hop stays beneath a grant (for the flag grants)",
    )
    p.add_argument(
        "--allow-directories",
        action="store_true",
        help=(
            "hand out directory fds beneath the flag grants (vvfat's directory scan "
            "needs it; such an fd lets the peer list and open everything beneath "
            "it itself, and openat(fd, '..') climbs out: docs/broker.md)"
        ),
    )
    p.add_argument(
        "--allow-devices",
        action="store_true",
        help=(
            "open device nodes, FIFOs and sockets beneath the flag grants (never "
            "blocking the broker: a FIFO is opened O_NONBLOCK; docs/broker.md)"
        ),
    )
    p.add_argument("--policy", metavar="FILE", help="TOML policy file (see below)")
    p.add_argument(
        "--refuse-errno",
        metavar="ERRNO",
        help="errno for refusals, by name or number (default EACCES)",
    )
    p.add_argument(
        "--peer-uid", type=int, metavar="UID", help="accept only peers with this uid (SO_PEERCRED)"
    )
    p.add_argument(
        "--peer-pid", type=int, metavar="PID", help="accept only peers with this pid (SO_PEERCRED)"
    )


def build_policy(args: argparse.Namespace) -> Policy:
    extra: dict[str, Any] = {}
    if args.refuse_errno is not None:
        extra["refuse_errno"] = parse_errno(args.refuse_errno, source="--refuse-errno")
    if args.peer_uid is not None:
        extra["peer_uid"] = args.peer_uid
    if args.peer_pid is not None:
        extra["peer_pid"] = args.peer_pid
    for flag, paths in (
        ("--allow-ro", args.allow_ro),
        ("--allow-rw", args.allow_rw),
        ("--allow-create", args.allow_create),
    ):
        for path in paths:
            if not os.path.isabs(path):
                raise PolicyError(f"{flag} {path!r}: grant paths must be absolute")
    flags_policy = Policy.from_grants(
        ro=args.allow_ro,
        rw=args.allow_rw,
        create=args.allow_create,
        symlinks=args.allow_symlinks,
        directories=args.allow_directories,
        devices=args.allow_devices,
    )
    policy = flags_policy
    if args.policy:
        policy = flags_policy.merged(Policy.from_toml(args.policy))
    if extra:
        policy = Policy(
            grants=policy.grants,
            refuse_errno=extra.get("refuse_errno", policy.refuse_errno),
            peer_uid=extra.get("peer_uid", policy.peer_uid),
            peer_pid=extra.get("peer_pid", policy.peer_pid),
            create_mode_mask=policy.create_mode_mask,
            source=policy.source,
        )
    return policy


def _inherited_socket(fd: int) -> socket.socket:
    try:
        st = os.fstat(fd)
    except OSError as err:
        raise TransportError(f"--fd {fd}: not an open descriptor ({err.strerror})") from err
    if not stat.S_ISSOCK(st.st_mode):
        raise TransportError(f"--fd {fd}: not a socket")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise TransportError(f"--fd {fd}: not a UNIX stream socket")
    try:
        sock.getpeername()
    except OSError as err:
        sock.detach()
        raise TransportError(f"--fd {fd}: socket is not connected") from err
    os.set_inheritable(fd, False)
    return sock


def _listen(path: str) -> socket.socket:
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise TransportError(f"--socket {path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale socket of a broker that died
        except OSError as err:
            if err.errno != errno.ENOENT:
                raise
        else:
            raise TransportError(f"--socket {path}: another broker is listening there")
        finally:
            probe.close()
    return listen_unix(path)


def run(args: argparse.Namespace) -> int:
    try:
        policy = build_policy(args)
        sock = _inherited_socket(args.fd) if args.fd is not None else _listen(args.socket)
        broker = Broker(
            policy, audit_path=args.audit, keep_records=False,
            exit_when_idle=args.fd is not None, poll_us=args.poll_us,
        )  # fmt: skip
    except (PolicyError, TransportError, OSError) as err:
        print(f"testbed broker: {err}", file=sys.stderr)
        return 2
    if args.fd is not None:
        broker.add_connection(sock)
        where = f"fd {args.fd}"
    else:
        broker.add_listener(sock)
        where = args.socket

    caught: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # No logging and no locks here: the handler runs between two bytecodes
        # of whatever the loop was doing, possibly inside a lock it would wait on.
        caught.append(signum)
        broker.stop_soon()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    print(
        f"testbed broker: serving {where}; grants: " + "; ".join(policy.describe()), file=sys.stderr
    )
    try:
        broker.serve()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if caught:
            log.info("signal %s: stopped", signal.Signals(caught[0]).name)
        if args.socket:
            with contextlib.suppress(OSError):
                os.unlink(args.socket)
    return 0


__all__ = ["build_policy", "register", "run"]
