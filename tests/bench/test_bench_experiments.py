"""Experiments when their transports cannot run: skipped rows and a reason, no crash."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from testbed.bench import qemus
from testbed.bench.env import Env
from testbed.bench.experiments import Context, blockdev, handover
from testbed.bench.plan import QUICK
from testbed.bench.runner import make_file
from testbed.bench.transports import TRANSPORTS, Services


def test_blockdev_without_any_qemu_skips_every_row_and_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        qemus,
        "qemu_binary",
        lambda version, kind: tmp_path / "build" / str(kind) / "qemu-system-x86_64",
    )
    env = Env(work_dir=tmp_path, file=make_file(tmp_path / "files"), warmup=0, qemu_version="7.2")
    services = Services(env, tmp_path / "qemu")
    plan = dataclasses.replace(QUICK, reps=1, qemu_versions=("7.2", "10.0"))
    ctx = Context(plan=plan, env=env, services=services,
                  qemu_root=tmp_path / "qemu", log=lambda m: None)  # fmt: skip
    try:
        out = blockdev.run(ctx)
    finally:
        services.close()
    # every transport on every version, the version in the row
    assert [(r.transport, r.qemu_version) for r in out.rows] == [
        (t, v) for v in ("7.2", "10.0") for t in TRANSPORTS.names()
    ]
    assert all("is not built" in r.skipped for r in out.rows)
    keys = {
        "qemu_hook_vs_path", "qemu_hook_c_vs_path", "qemu_hook_floor_vs_path",
        "qemu_hook_vs_hook_floor", "blockdev_add_supervised_vs_path",
        "qemu_hook_vs_path_unpinned", "qemu_hook_c_vs_path_unpinned",
        "qemu_hook_added_vs_broker_cpu",
    }  # fmt: skip
    assert set(out.missing) == keys | {f"{k}@10.0" for k in keys} and not out.ratios
    assert out.missing["qemu_hook_vs_path@10.0"] == "hook or path did not run on QEMU 10.0"


def test_handover_names_each_version_whose_stock_qemu_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        qemus,
        "qemu_binary",
        lambda version, kind: tmp_path / "build" / str(version) / "qemu-system-x86_64",
    )
    env = Env(work_dir=tmp_path, file=make_file(tmp_path / "files"), warmup=0, qemu_version="10.0")
    plan = dataclasses.replace(QUICK, reps=1, qemu_versions=("10.0", "7.2"))
    ctx = Context(plan=plan, env=env, services=Services(env, tmp_path / "qemu"),
                  qemu_root=tmp_path / "qemu", log=lambda m: None)  # fmt: skip
    out = handover.run(ctx)
    assert [(r.transport, r.qemu_version) for r in out.rows] == [
        ("qmp_add_fd", "10.0"), ("qmp_add_fd", "7.2"),
    ]  # fmt: skip
    # the first version listed is the primary one: its ratio has the plain key
    assert set(out.missing) == {"hook_vs_qmp_addfd", "hook_vs_qmp_addfd@7.2"}
    assert "stock QEMU 7.2" in out.missing["hook_vs_qmp_addfd@7.2"] and not out.ratios
