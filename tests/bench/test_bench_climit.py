"""The C baseline: compiles with the system cc and runs a few hundred ops."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from testbed.bench.climit import CMode, compile_c_limit, parse_summary, run_c
from testbed.bench.placement import Placement, cpus_for
from testbed.errors import CBenchError
from testbed.pytest_plugin import require


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(shutil.which("cc") is not None, "a C compiler (cc) for the C limit")
    return compile_c_limit(tmp_path_factory.mktemp("c_limit"))


@pytest.mark.parametrize("mode", list(CMode))
def test_each_mode_runs_and_reports_every_op(binary: Path, tmp_path: Path, mode: CMode) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"x")
    r = run_c(binary, mode, target, seconds=0.05, warmup=50, cpus=cpus_for(Placement.SAME_CORE))
    assert r.ops >= 1
    assert 0.04 < r.seconds < 1
    assert 0 < r.p50_us <= r.p95_us <= r.p99_us
    if mode is CMode.PINGPONG:
        assert r.broker_cpu_s is not None and r.broker_cpu_s > 0
    if mode is CMode.FLOOR:
        assert r.broker_cpu_s is None


def test_missing_file_is_an_error_naming_the_refusal(binary: Path, tmp_path: Path) -> None:
    with pytest.raises(CBenchError, match="broker refused the open"):
        run_c(
            binary, CMode.PINGPONG, tmp_path / "absent", seconds=0.05, warmup=1,
            cpus=cpus_for(Placement.UNPINNED),
        )  # fmt: skip


def test_recompiles_only_when_the_source_changed(binary: Path) -> None:
    before = binary.stat().st_mtime_ns
    assert compile_c_limit(binary.parent) == binary
    assert binary.stat().st_mtime_ns == before
    (binary.parent / "c_limit.c").write_text("/* stale */\n")
    compile_c_limit(binary.parent)
    assert binary.stat().st_mtime_ns != before


def test_parse_summary() -> None:
    assert parse_summary("ops=5 seconds=0.5 broker_cpu_s=0.1\n") == {
        "ops": 5, "seconds": 0.5, "broker_cpu_s": 0.1,
    }  # fmt: skip
    with pytest.raises(CBenchError, match="lacks"):
        parse_summary("ops=5 seconds=0.5")
    with pytest.raises(CBenchError, match="not a number"):
        parse_summary("ops=five seconds=0.5 broker_cpu_s=0")
    with pytest.raises(CBenchError, match="key=value"):
        parse_summary("Segmentation fault")
