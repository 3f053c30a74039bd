"""Deciding one open for the supervised process: the image policy, then the system profile.

Both halves are the broker's :class:`~testbed.broker.Gate` (one policy
engine): an absolute path under an image grant goes to the image gate
exactly as a ``-open-hook-fd`` request would, so the two front ends answer
alike.  Anything else is looked up in the system profile:

1. the path is resolved by the kernel (``O_PATH``, no magic links) to its
   real name, because system files are reached through symlinks that leave
   their directory (``/lib`` -> ``usr/lib``, ``/etc/localtime`` ->
   ``/usr/share/zoneinfo/...``) and the gate refuses those;
2. a real name in ``/proc/PID`` is allowed only for the caller's own
   process (``proc_self``): the supervisor opens with its own rights, so a
   ``/proc/<supervisor>/mem`` would otherwise be handed out;
3. the real name is opened by the system gate, beneath the resolved grant,
   without following symlinks: whatever is swapped in after step 1 cannot
   lead out of the grant.

An open that fails in step 1 answers the real errno (``ENOENT`` for a missing
``/etc/qemu/qemu.conf``, as open(2) would; QEMU treats EACCES there as fatal)
only when the path as asked lies under a profile grant strong enough for
the access; otherwise it is refused like any path outside the grants, so the
supervisor does not tell what exists elsewhere.
"""

from __future__ import annotations

import errno
import os

from testbed.broker import Access, Gate, Grant, Outcome, Policy
from testbed.broker.openat2 import RESOLVE_NO_MAGICLINKS, openat2
from testbed.broker.policy import needed_access
from testbed.protocol import OpenRequest
from testbed.supervise.profile import SystemProfile

AT_FDCWD = -100


class Decider:
    """Opens (or refuses) one absolute path for a caller of thread group ``tgid``."""

    def __init__(self, policy: Policy, profile: SystemProfile | None) -> None:
        self.policy = policy
        self.profile = profile
        # Each open is served in a worker thread of its own, so a FIFO may
        # block as open(2) would (QEMU's `exec:cat >FIFO` migrations).
        self.images = Gate(policy, may_block=True)
        self.system = Gate(profile.policy, may_block=True) if profile is not None else None

    def release_blocked(self) -> int:
        """Wake the workers blocked opening a FIFO (see Gate.release_blocked)."""
        gates = (self.images, self.system) if self.system else (self.images,)
        return sum(g.release_blocked() for g in gates)

    def close(self) -> None:
        self.images.close()
        if self.system is not None:
            self.system.close()

    def decide(self, path: str, flags: int, mode: int, *, tgid: int) -> tuple[Outcome, str]:
        """The outcome and which part decided it (``image``, ``system`` or ``none``)."""
        request = OpenRequest(path=os.fsencode(path), flags=flags, mode=mode)
        if self.policy.covering(path) or self.profile is None or self.system is None:
            return self.images.handle(request), "image"
        return self._system(path, request, tgid)

    def _refuse(self, reason: str) -> tuple[Outcome, str]:
        return self.images.refuse(reason), "none"

    def _lexical_access(self, path: str, tgid: int) -> Access | None:
        assert self.profile is not None
        if self.profile.proc_self and _proc_pid(path) == tgid:
            return Access.RO
        levels = [g.access for g in self.profile.grants if g.covers(path) is not None]
        return max(levels) if levels else None

    def _system(self, path: str, request: OpenRequest, tgid: int) -> tuple[Outcome, str]:
        assert self.profile is not None and self.system is not None
        nofollow = request.flags & os.O_NOFOLLOW
        try:
            probe = openat2(
                AT_FDCWD, path, os.O_PATH | os.O_CLOEXEC | nofollow, 0, RESOLVE_NO_MAGICLINKS
            )
        except OSError as err:
            if err.errno == errno.ELOOP:
                # a magic link (/proc/PID/root, /proc/PID/fd/N) or a loop: a
                # refusal, as the gate answers for a symlink it will not follow
                return self._refuse("path goes through a magic link or a symlink loop")
            # the name as asked, else with its existing part resolved (bin/../etc/...)
            level = self._lexical_access(path, tgid)
            if level is None or level < needed_access(request.flags):
                real = _real_name_of_missing(path)
                more = None if real is None else self._lexical_access(real, tgid)
                if more is not None and (level is None or more > level):
                    level = more
            if level is None:
                return self._refuse("not under any grant or the system profile")
            if level < needed_access(request.flags):
                return self._refuse(f"the system profile gives {level.label} access only")
            return Outcome.failed(err), "system"
        try:
            real = os.readlink(f"/proc/self/fd/{probe}")
        finally:
            os.close(probe)
        resolved = OpenRequest(path=os.fsencode(real), flags=request.flags, mode=request.mode)
        pid = _proc_pid(real)
        if pid is not None:
            if not self.profile.proc_self or not _same_process(pid, tgid):
                return self._refuse(f"{real} belongs to another process")
            # The caller's own /proc/PID: a grant made for this request, so the
            # gate opens beneath that very directory.
            own = Gate(Policy(grants=(Grant(path=f"/proc/{pid}", access=Access.RO),)))
            try:
                return own.handle(resolved), "system"
            finally:
                own.close()
        if not self.profile.policy.covering(real):
            return self._refuse(f"resolves to {real}, outside the grants and the system profile")
        return self.system.handle(resolved), "system"


def _real_name_of_missing(path: str) -> str | None:
    """``path`` with its longest existing ancestor resolved by the kernel, or None.

    A missing file's name may reach its grant only through ``..`` or a
    symlink (a build's ``bin/../etc/qemu/qemu.conf``): the part that exists
    is resolved as step 1 resolves a whole path, and the missing rest is
    joined to it, unless the rest has a ``..`` (which could only be judged by
    resolving what does not exist): then None, and the name is judged as asked.
    """
    head, rest = path, list[str]()
    while head not in ("/", ""):
        head, tail = os.path.split(head)
        rest.insert(0, tail)
        try:
            fd = openat2(AT_FDCWD, head or "/", os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_NO_MAGICLINKS)
        except OSError:
            continue
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        if ".." in rest:
            return None
        return os.path.join(real, *rest)
    return None


def _proc_pid(path: str) -> int | None:
    """N for a path ``/proc/N`` or ``/proc/N/...``."""
    if not path.startswith("/proc/"):
        return None
    head = path[len("/proc/") :].split("/", 1)[0]
    return int(head) if head.isdigit() else None


def _same_process(pid: int, tgid: int) -> bool:
    return pid == tgid or os.path.exists(f"/proc/{tgid}/task/{pid}")
