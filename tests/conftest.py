"""Shared fixtures for the testbed's own tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.broker import Policy, serve_socketpair
from testbed.transport import HookClient


def open_fds() -> set[int]:
    """The descriptors this process has open right now."""
    return {int(n) for n in os.listdir("/proc/self/fd")}


class BrokerPair:
    """A broker serving a socketpair, and a HookClient on the other end."""

    def __init__(self, policy: Policy) -> None:
        self.broker, theirs = serve_socketpair(policy)
        self.client = HookClient(theirs, timeout=10)

    def close(self) -> None:
        self.client.close()
        self.broker.stop()


@pytest.fixture
def grant_dir(tmp_path: Path) -> Path:
    d = tmp_path / "grant"
    d.mkdir()
    (d / "disk.img").write_bytes(b"disk-bytes")
    return d


@pytest.fixture
def make_pair() -> Iterator[type[BrokerPair]]:
    pairs: list[BrokerPair] = []

    class Tracked(BrokerPair):
        def __init__(self, policy: Policy) -> None:
            super().__init__(policy)
            pairs.append(self)

    yield Tracked
    for p in pairs:
        p.close()
