"""The series' C example server (patch 0005) serving one socket, logging to /dev/null.

Its log lines (one ``fprintf`` + ``fflush`` per request) are part of what
it does; they go to ``/dev/null`` as the Python broker writes no audit log.
"""

from __future__ import annotations

from testbed.bench.env import Env
from testbed.bench.placement import Cpus
from testbed.bench.qemus import find_open_hook_server, missing
from testbed.bench.servers import PingPong, Session, spawned
from testbed.errors import UnknownPartError


class OpenHookServer(PingPong):
    name = "open_hook_server"
    what = "contrib/open-hook-server (C, patch 0005) --fd N --root DIR"

    def unavailable(self, env: Env) -> str | None:
        try:
            return missing(find_open_hook_server(env.qemu_version), "open-hook-server")
        except UnknownPartError as err:
            return str(err)

    def open(self, env: Env, cpus: Cpus) -> Session:
        binary = find_open_hook_server(env.qemu_version)
        argv = [str(binary), "--root", str(env.file.parent), "--log", "/dev/null", "--fd", "{fd}"]
        return spawned(argv, env, cpus)


PART = OpenHookServer()
