"""``open`` + ``close`` in the client itself (``c_limit.c floor``): no passing at all."""

from __future__ import annotations

from testbed.bench.climit import CMode
from testbed.bench.env import Env
from testbed.bench.placement import Cpus, Placement
from testbed.bench.servers import PingPong, Session
from testbed.bench.servers.c_limit import CSession


class CFloor(PingPong):
    name = "c_floor"
    what = "c_limit.c floor: open + close in one C process"
    placements = (Placement.SAME_CORE,)

    def unavailable(self, env: Env) -> str | None:
        return None if env.c_limit is not None else f"c_limit.c not compiled: {env.c_limit_error}"

    def open(self, env: Env, cpus: Cpus) -> Session:
        return CSession(env, cpus, CMode.FLOOR)


PART = CFloor()
