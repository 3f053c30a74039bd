"""The broker-under-load harness against the project's broker, for a fraction of a second."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.bench.brokerload import BrokerProcess, ClientPool
from testbed.bench.runner import make_file
from testbed.errors import BrokerBenchError


def test_clients_run_timed_rounds(tmp_path: Path) -> None:
    f = make_file(tmp_path / "files")
    with (
        BrokerProcess(f.parent, cpu=None) as broker,
        ClientPool(3, broker, f, cpu=None, warmup=20) as pool,
    ):
        first = pool.round(0.1)
        second = pool.round(0.1)
    for r in (first, second):
        assert r.ops >= 3  # every client completed at least one op in its window
        assert 0.09 < r.seconds < 2
        assert r.broker_cpu_s is not None and r.broker_cpu_s > 0
        assert r.p50_us <= r.p99_us


def test_a_refused_open_stops_the_run_with_the_reason(tmp_path: Path) -> None:
    granted = tmp_path / "granted"
    granted.mkdir()
    outside = make_file(tmp_path / "elsewhere")
    with (
        BrokerProcess(granted, cpu=None) as broker,
        pytest.raises(BrokerBenchError, match=r"client 0: ReplyError: reply -13"),
    ):
        ClientPool(1, broker, outside, cpu=None, warmup=1)


def test_a_broker_that_does_not_start_is_reported(tmp_path: Path) -> None:
    with pytest.raises(BrokerBenchError, match="broker exited"):
        BrokerProcess(tmp_path, cpu=None, command=lambda s, d: ["false"])
