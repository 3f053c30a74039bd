"""Fixtures for the broker's tests: a world-readable directory, broker processes."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.broker.brokerproc import BrokerProc


@pytest.fixture
def public() -> Iterator[Path]:
    """A directory every user can read (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="broker-test-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def broker_proc(public: Path) -> Iterator[Any]:
    started: list[BrokerProc] = []

    def start(grants: list[dict[str, Any]], **kwargs: Any) -> BrokerProc:
        b = BrokerProc(public, grants, **kwargs)
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()
