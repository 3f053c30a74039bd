"""``testbed supervise``: run a command with its opens served under a policy."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from types import FrameType
from typing import Any

from testbed.broker.command import build_policy
from testbed.errors import PolicyError, SuperviseError
from testbed.supervise.profile import DEFAULT_PROFILE, builtin_profiles
from testbed.supervise.supervisor import Supervisor

DESCRIPTION = """\
Run COMMAND (normally an unmodified QEMU) with every open, openat, openat2
and creat it makes turned into a seccomp user notification that this
supervisor answers: it opens the file itself under the policy (the same
grants, gate and audit log as 'testbed broker') and installs the descriptor
in COMMAND, or answers the errno.  Files outside the grants come from the
system profile (libraries, firmware, /proc, /sys, a few /dev nodes),
read-only.  Exits with COMMAND's status (128+N if a signal N killed it);
SIGTERM, SIGINT and SIGHUP are passed on to it.

The descriptors given to this command (stdin, stdout, stderr and any other
inherited fd) reach COMMAND unchanged, so '-qmp stdio' and
'-chardev socket,fd=N' work as without the supervisor.

--landlock also confines COMMAND with Landlock: read access to what the
system profile lists, execute on the binary and its ELF interpreter,
nothing on the image grants.  It can then reach its images only through
the supervisor.  --landlock-only confines without serving anything: the
negative control, where QEMU fails to open its images with 'Permission
denied'.

i386 and x32 system calls kill COMMAND; io_uring_setup fails with ENOSYS
(an io_uring open is invisible to seccomp), open_by_handle_at with EPERM.
If this supervisor dies, COMMAND's later opens fail with ENOSYS and the
files it has open keep working.
"""

EPILOG = """\
system profile (TOML), --system-profile NAME or FILE (built in: {profiles}):
  [profile]
  description = "..."
  proc_self = true            # the caller's own /proc/PID, read-only
  exec = ["/usr/bin/stdbuf"]  # more executables Landlock allows
  [[grant]]                   # as in a broker policy file
  path = "/usr/lib"
  access = "ro"

audit log: the broker's JSON lines, plus "via": "seccomp" and "tid" (the
calling thread; peer_pid is its process).

examples:
  testbed supervise --allow-create /srv/vm1 --landlock --audit vm1.jsonl -- \\
      qemu-system-x86_64 -nodefaults -display none -qmp stdio \\
      -drive file=/srv/vm1/disk.qcow2,if=none,id=d0
  testbed supervise --landlock-only -- qemu-system-x86_64 -drive file=/srv/vm1/disk.qcow2
"""


def register(sub: Any) -> None:
    """The ``supervise`` subcommand and its options.

    Long because it is one flat list of options; split, they would only scatter.
    """
    p: argparse.ArgumentParser = sub.add_parser(
        "supervise",
        help="run a command (an unmodified QEMU) with its opens served by seccomp notification",
        description=DESCRIPTION,
        epilog=EPILOG.format(profiles=", ".join(builtin_profiles())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, what in (
        ("--allow-ro", "grant read-only opens of PATH (a file, or everything beneath a directory)"),
        ("--allow-rw", "grant read-write opens of PATH (no creating files)"),
        ("--allow-create", "grant read-write opens and O_CREAT beneath PATH"),
    ):
        p.add_argument(flag, action="append", default=[], metavar="PATH", help=what)
    p.add_argument(
        "--allow-symlinks",
        action="store_true",
        help="follow symlinks that stay beneath the grant (for the flag grants)",
    )
    p.add_argument(
        "--allow-directories",
        action="store_true",
        help="open directories beneath the flag grants (vvfat's scan; as for 'testbed broker')",
    )
    p.add_argument(
        "--allow-devices",
        action="store_true",
        help="open device nodes, FIFOs and sockets beneath the flag grants (as for "
        "'testbed broker'; QEMU's migration FIFOs need it)",
    )
    p.add_argument("--policy", metavar="FILE", help="TOML policy file, as for 'testbed broker'")
    p.add_argument("--refuse-errno", metavar="ERRNO", help="errno for refusals (default EACCES)")
    p.add_argument(
        "--system-profile",
        default=DEFAULT_PROFILE,
        metavar="NAME|FILE",
        help=f"what may be opened besides the grants (default {DEFAULT_PROFILE})",
    )
    p.add_argument("--landlock", action="store_true", help="also confine COMMAND with Landlock")
    p.add_argument(
        "--landlock-only",
        action="store_true",
        help="confine COMMAND with Landlock and serve nothing (the negative control)",
    )
    p.add_argument(
        "--allow-exec",
        action="append",
        default=[],
        metavar="PATH",
        help="with Landlock: one more executable COMMAND may run (e.g. what a wrapper execs)",
    )
    p.add_argument("--audit", metavar="FILE", help="append one JSON line per open to FILE")
    p.add_argument(
        "--max-workers",
        type=int,
        default=32,
        metavar="N",
        help="opens served at once; more wait (default 32: that many hung opens stall the rest)",
    )
    p.add_argument(
        "--die-with-supervisor",
        action="store_true",
        help="SIGKILL COMMAND if the supervisor dies (by default COMMAND keeps running "
        "and its later opens fail ENOSYS); for callers that take this pid for COMMAND's "
        "and kill -KILL it, as QEMU's iotests do",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("testbed supervise: no COMMAND given (put it after --)", file=sys.stderr)
        return 2
    args.peer_uid = args.peer_pid = None
    try:
        policy = build_policy(args)
        sup = Supervisor(
            policy,
            profile=args.system_profile,
            landlock=args.landlock,
            landlock_only=args.landlock_only,
            audit_path=args.audit,
            keep_records=False,
            exec_paths=args.allow_exec,
            max_workers=args.max_workers,
            die_with_supervisor=args.die_with_supervisor,
        )
    except (PolicyError, SuperviseError, OSError, ValueError) as err:
        print(f"testbed supervise: {err}", file=sys.stderr)
        return 2
    try:
        # close_fds=False: every inheritable descriptor reaches COMMAND as it
        # reached us (ours are all close-on-exec).
        proc = sup.popen(command, close_fds=False)
    except (SuperviseError, OSError) as err:
        print(f"testbed supervise: {err}", file=sys.stderr)
        sup.close()
        return 127 if isinstance(err, FileNotFoundError) else 2

    _let_go_of_inherited_fds()

    def forward(signum: int, _frame: FrameType | None) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        while True:
            try:
                code = sup.wait()
                break
            except subprocess.TimeoutExpired:  # pragma: no cover - wait() has no timeout
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        sup.close()
    return 128 - code if code < 0 else code


def _let_go_of_inherited_fds() -> None:
    """Drop our copies of what the caller gave COMMAND, so that COMMAND closing
    one is seen at once (a QMP peer gets its EOF from QEMU, not from us).
    Ours are all close-on-exec; stderr stays for our own messages."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        with contextlib.suppress(OSError):
            if os.get_inheritable(fd):
                os.close(fd)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    os.close(null)


__all__ = ["register", "run"]
