"""The seccomp supervisor serving a C child's ``openat`` + ``close`` loop.

The child is ``c_limit.c floor`` (the very program of ``c_floor``: open the
64 KiB file, close it, in a loop), started under ``python -m testbed
supervise --allow-ro DIR --allow-create TMP --`` as users start it (TMP
takes the latencies file it writes at the end); every ``openat`` is a
notification the supervisor serves under the policy and answers with an
injected fd.  Against ``c_floor`` it is the supervisor's cost per open;
against ``broker`` and ``open_hook_server`` it is the hook's round trip
measured the other way.  The supervisor's CPU is not separated from the
child's, so the figure is time per open (ops/s, latencies).
"""

from __future__ import annotations

import sys
from pathlib import Path

from testbed.bench.climit import CMode, Wrapper
from testbed.bench.env import Env
from testbed.bench.placement import Cpus, Placement
from testbed.bench.servers import PingPong, Session
from testbed.bench.servers.c_limit import CSession
from testbed.errors import KernelFeatureError
from testbed.supervise.seccomp import check_user_notification


def supervise_argv(env: Env) -> Wrapper:
    """``testbed supervise`` granting the file's directory and the latencies' one."""

    def words(out_dir: Path) -> list[str]:
        return [
            sys.executable, "-m", "testbed", "supervise",
            "--allow-ro", str(env.file.parent), "--allow-create", str(out_dir), "--",
        ]  # fmt: skip

    return words


class Seccomp(PingPong):
    name = "seccomp"
    what = "testbed supervise -- c_limit floor: openat+close served by seccomp notification"
    placements = (Placement.SAME_CORE, Placement.UNPINNED)

    def unavailable(self, env: Env) -> str | None:
        if env.c_limit is None:
            return f"c_limit.c not compiled: {env.c_limit_error}"
        try:
            check_user_notification()
        except KernelFeatureError as err:
            return str(err)
        return None

    def open(self, env: Env, cpus: Cpus) -> Session:
        return CSession(env, cpus, CMode.FLOOR, wrapper=supervise_argv(env))


PART = Seccomp()
