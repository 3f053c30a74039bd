"""The child side: what runs between ``fork`` and ``execve`` of the supervised command.

Everything the child needs is prepared by the parent first (the BPF
program, the Landlock ruleset fd, the socket to send the listener back on),
so the child only makes system calls, in this order:

1. ``prctl(PR_SET_NO_NEW_PRIVS)`` (both seccomp and Landlock need it);
2. with Landlock: a rule for its own ``/proc/PID`` if the profile wants it
   (the pid is only known in the child), then ``landlock_restrict_self``;
3. with the filter: ``seccomp(SECCOMP_SET_MODE_FILTER, NEW_LISTENER |
   WAIT_KILLABLE_RECV)``, the listener fd sent to the parent with
   SCM_RIGHTS and *closed*: a process that kept its own listener could
   answer its own opens;
4. ``execve`` (by subprocess).  The parent is never confined.

It runs as subprocess's ``preexec_fn``.  That is safe here although the
parent has threads: the function takes no lock another thread could hold
(no logging, no imports, no I/O but the socket), and any open the child
makes after step 3 is served by the parent's receiver, which is already
waiting.  A failure is sent back on the socket as text, so the parent can
say which step failed and why.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

from testbed.supervise import landlock
from testbed.supervise.seccomp import (
    PR_SET_NO_NEW_PRIVS,
    PR_SET_PDEATHSIG,
    SECCOMP_FILTER_FLAG_NEW_LISTENER,
    SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV,
    install_filter,
    libc,
)

#: Messages on the socket: the listener rides with LISTENER; NONE when there is no filter.
LISTENER = b"L"
NONE = b"N"
FAILED = b"E"


@dataclass(frozen=True, kw_only=True)
class ChildPlan:
    """What the child does; ``program`` None means Landlock only (nothing served)."""

    sock: socket.socket
    program: bytes | None
    ruleset_fd: int | None = None
    proc_self_rights: landlock.FS | None = None
    wait_killable: bool = True
    #: SIGKILL the command when the supervisor dies (PR_SET_PDEATHSIG), for
    #: callers that take the supervisor's pid for the command's.
    die_with_parent: bool = False


def child_side(plan: ChildPlan) -> Callable[[], None]:
    """The ``preexec_fn`` for ``plan``."""
    lib = libc()  # resolved in the parent, not after fork
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER
    if plan.wait_killable:
        flags |= SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    sock = plan.sock
    parent = os.getpid()

    def run() -> None:
        step = "prctl(PR_SET_NO_NEW_PRIVS)"
        try:
            if plan.die_with_parent:
                step = "prctl(PR_SET_PDEATHSIG)"
                if lib.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, os.strerror(code))
                if os.getppid() != parent:  # it died before the prctl took effect
                    raise OSError(errno.ESRCH, "the supervisor is gone")
                step = "prctl(PR_SET_NO_NEW_PRIVS)"
            if lib.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))
            if plan.ruleset_fd is not None:
                if plan.proc_self_rights is not None:
                    step = "landlock_add_rule(/proc/self)"
                    landlock.add_rule(plan.ruleset_fd, "/proc/self", plan.proc_self_rights)
                step = "landlock_restrict_self"
                landlock.restrict_self(plan.ruleset_fd)
                os.close(plan.ruleset_fd)
            if plan.program is not None:
                step = "seccomp(SECCOMP_SET_MODE_FILTER)"
                listener = install_filter(plan.program, flags)
                step = "sending the listener to the supervisor"
                socket.send_fds(sock, [LISTENER], [listener])
                os.close(listener)
            else:
                sock.sendall(NONE)
            sock.close()
        except OSError as err:
            with contextlib.suppress(OSError):
                sock.sendall(FAILED + f"{step}: {err.strerror or err}".encode())
            raise

    return run
