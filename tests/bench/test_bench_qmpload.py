"""QMP transports against Debian's QEMU, a handful of ops."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from testbed.bench.qmpload import STOCK_QEMU, add_fd_runs, blockdev_runs
from testbed.bench.runner import make_file
from testbed.pytest_plugin import require

pytestmark = pytest.mark.stock_qemu


@pytest.fixture
def image(tmp_path: Path) -> Path:
    require(shutil.which(STOCK_QEMU) is not None, f"Debian's QEMU at {STOCK_QEMU}")
    return make_file(tmp_path / "files")


def test_add_fd_round_trips(image: Path) -> None:
    runs = asyncio.run(add_fd_runs(STOCK_QEMU, image, reps=2, ops=10, warmup=2))
    assert [r.figures.ops for r in runs] == [10, 10]
    assert all(r.add_p50_us is None for r in runs)


@pytest.mark.parametrize("via", ["path", "fdset"])
def test_blockdev_add_and_del(image: Path, via: str) -> None:
    runs = blockdev_runs(STOCK_QEMU, image, via=via, reps=1, ops=10, warmup=2)
    (run,) = runs
    assert run.figures.ops == 10
    assert run.add_p50_us is not None and 0 < run.add_p50_us <= run.figures.p99_us


def test_blockdev_via_unknown_is_refused(image: Path) -> None:
    with pytest.raises(ValueError, match="via 'nfs'"):
        blockdev_runs(STOCK_QEMU, image, via="nfs", reps=1, ops=1, warmup=0)


def test_blockdev_add_repetitions(image: Path) -> None:
    runs = blockdev_runs(STOCK_QEMU, image, via="path", reps=2, ops=5, warmup=1)
    assert [r.figures.ops for r in runs] == [5, 5]
    assert all(r.add_p50_us is not None and r.add_p50_us > 0 for r in runs)
