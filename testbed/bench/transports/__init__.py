"""How image files reach QEMU, one module per transport.

Each module defines ``PART``, a :class:`Transport`; the QEMU experiments
(start-up against chain depth, ``blockdev-add``, ``blockdev-snapshot-sync``)
interleave every registered transport, in registration order.  A transport
says which QEMU build it needs and turns "this chain at start, these files
later" into a :class:`~testbed.bench.qemurun.Launch`.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from testbed.bench.brokerload import BrokerProcess, SpawnedServer
from testbed.bench.chain import Chain
from testbed.bench.client import one_op
from testbed.bench.env import Env
from testbed.bench.qemurun import Launch
from testbed.bench.qemus import Build, find_qemu, missing
from testbed.bench.registry import Registry
from testbed.broker import Policy
from testbed.errors import UnknownPartError
from testbed.protocol import encode_request


class Services:
    """What the transports of one run share: the broker daemon, started on first use.

    The daemon is ``testbed broker --socket`` granted ``root`` (create), as
    libvirt's would be running before any QEMU starts; every hooked QEMU
    gets its own connection to it.
    """

    def __init__(self, env: Env, root: Path) -> None:
        self.env = env
        self.root = root
        self._broker: BrokerProcess | None = None
        self._policy: Policy | None = None

    def policy(self) -> Policy:
        """What the seccomp supervisor grants: ``root`` (create), as the broker daemon's."""
        if self._policy is None:
            self._policy = Policy.from_grants(create=[str(self.root)])
        return self._policy

    def broker(self) -> BrokerProcess:
        if self._broker is None:
            root = str(self.root)

            def argv(path: str, _: Path) -> list[str]:
                return [sys.executable, "-m", "testbed", "broker", "--socket", path,
                        "--allow-create", root]  # fmt: skip

            self._broker = BrokerProcess(self.root, cpu=None, command=argv)
        return self._broker

    def connect(self) -> socket.socket:
        """A new connection to the broker daemon (one per QEMU, as its -open-hook-fd)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.broker().socket_path)
        return sock

    def close(self) -> None:
        if self._broker is not None:
            self._broker.stop()
            self._broker = None


class Transport(abc.ABC):
    name: ClassVar[str]
    what: ClassVar[str]
    build: ClassVar[Build] = Build.PATCHED

    def binary(self, version: str) -> Path:
        """The QEMU it runs at ``version`` ("7.2", "10.0")."""
        return find_qemu(self.build, version)

    #: the experiments it serves (None: every QEMU experiment)
    experiments: ClassVar[frozenset[str] | None] = None

    def unavailable_in(self, services: Services) -> str | None:
        """Why this transport cannot run with this run's services (None: it can)."""
        return None

    def unavailable(self, version: str) -> str | None:
        """Why this transport cannot run here on QEMU ``version`` (None: it can)."""
        try:
            return missing(self.binary(version), f"{self.build.value} QEMU {version}")
        except UnknownPartError as err:
            return str(err)

    @abc.abstractmethod
    def launch(
        self, services: Services, chain: Chain | None, later: Sequence[Path] = (), *, version: str
    ) -> Launch:
        """``chain`` attached as node ``top`` at start; ``later`` files handed over at run time;
        ``version`` is the QEMU's (for what the transport starts beside it)."""


def chain_node(chain: Chain, filename: Sequence[str] | None = None) -> dict[str, Any]:
    """``-blockdev`` options for the chain's top; with ``filename`` (top first), every
    layer is spelled out with its own file name (fd sets), else QEMU follows the
    backing names stored in the images."""
    if filename is None:
        return {"driver": "qcow2", "node-name": "top",
                "file": {"driver": "file", "filename": str(chain.top)}}  # fmt: skip
    node: dict[str, Any] | None = None
    for name in reversed(filename):
        layer: dict[str, Any] = {"driver": "qcow2", "file": {"driver": "file", "filename": name}}
        layer["backing"] = node  # None for the base: no backing file
        node = layer
    assert node is not None
    node["node-name"] = "top"
    return node


def flat_chain_args(filenames: Sequence[str]) -> tuple[str, ...]:
    """The chain as libvirt writes it: base first, a ``file`` and a ``qcow2`` node per
    layer, each format node naming its backing node (``null`` for the base); the top's
    format node is ``top``.  Flat, unlike :func:`chain_node` with names, whose nesting
    QEMU takes quadratic time to process (depth 64: ~190 ms against ~27 ms)."""
    args: list[str] = []
    below: str | None = None
    for i, name in reversed(list(enumerate(filenames))):
        storage, fmt = f"storage{i}", ("top" if i == 0 else f"format{i}")
        ro = i != 0  # backing layers read-only, as libvirt opens them
        file_node = {"driver": "file", "filename": name, "node-name": storage, "read-only": ro}
        fmt_node = {"driver": "qcow2", "node-name": fmt, "file": storage, "backing": below,
                    "read-only": ro}  # fmt: skip
        args += ["-blockdev", json.dumps(file_node), "-blockdev", json.dumps(fmt_node)]
        below = fmt
    return tuple(args)


def serving_launch(argv: Sequence[str], probe: str | Path, args: Sequence[str] = ()) -> Launch:
    """A launch whose ``-open-hook-fd`` is a server of its own (``argv``, ``{fd}`` for its
    socket), started and known to be serving (one open of ``probe`` answered, its
    start-up done) before QEMU's clock starts, as a broker daemon's would be."""
    server = SpawnedServer(argv, cpu=None)
    fd = server.client_fd
    assert fd is not None
    check = socket.socket(fileno=os.dup(fd))
    try:
        check.settimeout(10)
        one_op(check, encode_request(str(probe), os.O_RDONLY, 0))
    finally:
        check.close()
    return Launch(args=tuple(args), hook_fd=fd, spawned=server.release_client,
                  finished=server.stop, server=server)  # fmt: skip


def blockdev_args(node: dict[str, Any]) -> tuple[str, ...]:
    return ("-blockdev", json.dumps(node))


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


TRANSPORTS: Registry[Transport] = Registry(
    __name__,
    {
        "path": "path",
        "hook": "hook",
        "hook_c": "hook_c",
        "fdset": "fdset",
        "hook_floor": "hook_floor",
        "path_flat": "path_flat",
        "path_debian": "path_debian",
        "seccomp": "seccomp",
        "seccomp_landlock": "seccomp_landlock",
    },
    Transport,
)
