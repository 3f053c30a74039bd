"""The C ping-pong (``c_limit.c``): a C client and a forked C server, the kernel's limit."""

from __future__ import annotations

from testbed.bench.climit import CMode, Wrapper, run_c
from testbed.bench.env import Env
from testbed.bench.placement import Cpus
from testbed.bench.servers import PingPong, Session
from testbed.bench.stats import RunFigures


class CSession:
    def __init__(
        self, env: Env, cpus: Cpus, mode: CMode = CMode.PINGPONG, *, wrapper: Wrapper | None = None
    ) -> None:
        assert env.c_limit is not None
        self.env, self.cpus, self.binary, self.mode = env, cpus, env.c_limit, mode
        self.wrapper = wrapper

    def round(self, seconds: float) -> RunFigures:
        return run_c(
            self.binary, self.mode, self.env.file, seconds=seconds,
            warmup=self.env.warmup, cpus=self.cpus, wrapper=self.wrapper,
        )  # fmt: skip

    def close(self) -> None:
        pass


class CLimit(PingPong):
    name = "c_limit"
    what = "c_limit.c pingpong: C client, forked C server, open + SCM_RIGHTS"

    def unavailable(self, env: Env) -> str | None:
        return None if env.c_limit is not None else f"c_limit.c not compiled: {env.c_limit_error}"

    def open(self, env: Env, cpus: Cpus) -> Session:
        return CSession(env, cpus)


PART = CLimit()
