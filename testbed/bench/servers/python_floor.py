"""The broker's per-request system calls in a bare Python loop (:mod:`testbed.bench.pyfloor`)."""

from __future__ import annotations

from testbed.bench.env import Env
from testbed.bench.placement import Cpus
from testbed.bench.servers import PingPong, Session, floor_argv, spawned


class PythonFloor(PingPong):
    name = "python_floor"
    what = "the broker's syscalls per request (from strace) in a bare Python loop"

    def unavailable(self, env: Env) -> str | None:
        if env.floor_program is None:
            return f"no program for the floor: {env.floor_error}"
        return None

    def open(self, env: Env, cpus: Cpus) -> Session:
        return spawned(floor_argv(env), env, cpus)


PART = PythonFloor()
