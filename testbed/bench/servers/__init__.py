"""Ping-pong servers: who answers one client's QEMU_OPEN requests, one module each.

Each module defines ``PART``, a :class:`PingPong`.  The ping-pong
experiment runs every registered server in turn, repetition by repetition.
"""

from __future__ import annotations

import abc
import json
import sys
from pathlib import Path
from typing import ClassVar, Protocol

from testbed.bench.brokerload import BrokerProcess, ClientPool, SpawnedServer, broker_argv
from testbed.bench.env import Env
from testbed.bench.placement import Cpus, Placement
from testbed.bench.registry import Registry
from testbed.bench.stats import RunFigures


class Session(Protocol):
    def round(self, seconds: float) -> RunFigures: ...
    def close(self) -> None: ...


class PingPong(abc.ABC):
    """A server measured with one client over -open-hook-fd frames."""

    name: ClassVar[str]
    what: ClassVar[str]
    #: the placements it is measured under (None: every one)
    placements: ClassVar[tuple[Placement, ...] | None] = None

    def unavailable(self, env: Env) -> str | None:
        """Why this server cannot run here (None: it can)."""
        return None

    @abc.abstractmethod
    def open(self, env: Env, cpus: Cpus) -> Session:
        """The server started and pinned, with one warmed-up client."""


class PooledSession:
    """A server process (pinned) and one client process of :mod:`testbed.bench.client`."""

    def __init__(self, server: BrokerProcess | SpawnedServer, env: Env, cpus: Cpus) -> None:
        self.server = server
        try:
            server.pin(cpus.broker)
            self.pool = ClientPool(1, server, env.file, cpu=cpus.client, warmup=env.warmup)
        except BaseException:
            server.stop()
            raise

    def round(self, seconds: float) -> RunFigures:
        return self.pool.round(seconds)

    def close(self) -> None:
        self.pool.close()
        self.server.stop()


def spawned(argv: list[str], env: Env, cpus: Cpus) -> PooledSession:
    return PooledSession(SpawnedServer(argv, cpu=cpus.broker), env, cpus)


def broker_session(env: Env, cpus: Cpus) -> PooledSession:
    server = BrokerProcess(env.file.parent, cpu=cpus.broker, command=broker_argv)
    return PooledSession(server, env, cpus)


def floor_argv(env: Env, root: Path | None = None) -> list[str]:
    """The floor serving files beneath ``root`` (default: the ping-pong file's directory)."""
    assert env.floor_program is not None
    program = json.dumps([s.to_json() for s in env.floor_program])
    where = env.file.parent if root is None else root
    return [
        sys.executable, "-m", "testbed.bench.pyfloor",
        "--fd", "{fd}", "--root", str(where), "--program", program,
    ]  # fmt: skip


SERVERS: Registry[PingPong] = Registry(
    __name__,
    {
        "broker": "broker",
        "python_floor": "python_floor",
        "open_hook_server": "open_hook_server",
        "c_limit": "c_limit",
        "c_floor": "c_floor",
        "c_pidfd": "c_pidfd",
        "seccomp": "seccomp",
    },
    PingPong,
)
