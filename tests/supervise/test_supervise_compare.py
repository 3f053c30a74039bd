"""The seccomp oracle against stock QEMU under strace and against the patched QEMU's hook,
for every scenario of the matrix."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.compare.compare import Status, compare_pair
from testbed.compare.run import run_scenario
from testbed.compare.runners.images import load_index
from testbed.compare.runners.seccomp import KNOWN_DIVERGENCES
from testbed.compare.runners.setup import Binaries
from testbed.compare.scenarios import Scenario, build_matrix
from testbed.pytest_plugin import require
from testbed.qemu.binaries import REPO_ROOT, STOCK_QEMU, is_runnable, patched_qemu_path

pytestmark = [pytest.mark.stock_qemu, pytest.mark.images, pytest.mark.slow]

INDEX = REPO_ROOT / "build" / "images" / "index.json"


def binaries() -> Binaries:
    return Binaries(patched=patched_qemu_path(), stock=STOCK_QEMU)


@pytest.mark.parametrize("sc", build_matrix(), ids=lambda s: s.name)
def test_seccomp_trace_equals_stock_strace(sc: Scenario, tmp_path: Path, kernel: None) -> None:
    require(INDEX.exists(), f"the image corpus {INDEX} (make images)")
    images = load_index(INDEX)
    res = run_scenario(sc, images[sc.image], tmp_path, ("stock", "seccomp"), binaries=binaries())
    stock, seccomp = res.oracles["stock"], res.oracles["seccomp"]
    require(not stock.skipped and not seccomp.skipped, stock.skipped or seccomp.skipped)
    pair = compare_pair(
        "seccomp", seccomp.trace, "stock", stock.trace, tags=sc.tags, table=KNOWN_DIVERGENCES
    )
    assert pair.status != Status.MISMATCH, "\n".join(pair.diff)
    assert len(seccomp.trace) > 0


@pytest.mark.qemu
@pytest.mark.parametrize("sc", build_matrix(), ids=lambda s: s.name)
def test_seccomp_trace_equals_the_hooks_but_for_directory_scans(
    sc: Scenario, tmp_path: Path, kernel: None
) -> None:
    require(INDEX.exists(), f"the image corpus {INDEX} (make images)")
    require(is_runnable(patched_qemu_path()), f"patched QEMU {patched_qemu_path()} (make qemu)")
    images = load_index(INDEX)
    res = run_scenario(sc, images[sc.image], tmp_path, ("patched", "seccomp"), binaries=binaries())
    patched, seccomp = res.oracles["patched"], res.oracles["seccomp"]
    require(not patched.skipped and not seccomp.skipped, patched.skipped or seccomp.skipped)
    pair = compare_pair(
        "patched", patched.trace, "seccomp", seccomp.trace, tags=sc.tags, table=KNOWN_DIVERGENCES
    )
    assert pair.status != Status.MISMATCH, "\n".join(pair.diff)
    # with patch 0008 the hook sees vvfat's directory scans too: nothing to excuse
    assert not pair.divergences
