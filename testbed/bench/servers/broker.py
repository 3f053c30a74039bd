"""The project's broker, started as users start it (``testbed broker --socket``)."""

from __future__ import annotations

from testbed.bench.env import Env
from testbed.bench.placement import Cpus
from testbed.bench.servers import PingPong, Session, broker_session


class Broker(PingPong):
    name = "broker"
    what = "python -m testbed broker --socket PATH --allow-ro DIR, one client"

    def open(self, env: Env, cpus: Cpus) -> Session:
        return broker_session(env, cpus)


PART = Broker()
