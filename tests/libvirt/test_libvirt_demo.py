"""``testbed libvirt demo`` against Debian's libvirtd, for every built QEMU version and mode.

Each run starts libvirtd and virtlogd if none are running and stops what it
started (about 15 s with a warm capability cache; the first probe of a new
emulator binary costs libvirt 25 to 50 s more).  Modes: ``hook`` (the
patched QEMU and its broker) and ``supervise`` (stock QEMU, its opens served
by the seccomp supervisor, confined by Landlock).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from testbed.errors import LibvirtError
from testbed.guest.artifacts import guest_available
from testbed.libvirt.daemons import running_pid
from testbed.libvirt.demo import Demo, DemoOptions, DemoResult, DemoStep, run_demo
from testbed.libvirt.emulator import Mode
from testbed.libvirt.install import built_versions, stock_source
from testbed.pytest_plugin import require
from testbed.qemu.binaries import is_runnable

WORKDIR = Path("/var/lib/testbed/libvirt/tests")


def test_a_failing_step_is_recorded_and_ends_the_run(tmp_path: Path) -> None:
    demo = Demo(DemoOptions(workdir=tmp_path))
    with demo.step("fine"):
        pass
    with pytest.raises(LibvirtError, match="step 'broken': boom"), demo.step("broken"):
        raise LibvirtError("boom")
    assert [(s.name, s.ok, s.error) for s in demo.steps] == [
        ("fine", True, None),
        ("broken", False, "boom"),
    ]


def result(**kw: object) -> DemoResult:
    base: dict[str, object] = {
        "domain": "d",
        "qemu_version": "7.2",
        "mode": "hook",
        "steps": (DemoStep(name="a", ok=True),),
        "records_written": 5,
        "records_verified": 5,
        "lost": 0,
        "broker_requests": 3,
        "qemu_user": "libvirt-qemu",
        "console_log": "",
        "audit_log": "",
    }
    base.update(kw)
    return DemoResult(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [
        {"lost": 1},
        {"qemu_user": "root"},
        {"qemu_user": None},
        {"error": "x"},
        {"steps": (DemoStep(name="a", ok=False, error="e"),)},
    ],
)
def test_a_run_is_ok_only_unprivileged_complete_and_lossless(bad: dict[str, object]) -> None:
    assert result().ok
    assert not result(**bad).ok
    assert set(result().to_json()) >= {
        "steps", "records_written", "records_verified", "lost", "broker_requests", "qemu_user"
    }  # fmt: skip


@pytest.mark.libvirt
@pytest.mark.slow
@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("version", built_versions() or ["7.2"])
def test_demo_loses_nothing_with_qemu_unprivileged(version: str, mode: Mode) -> None:
    for binary in ("libvirtd", "virtlogd", "virsh"):
        require(shutil.which(binary) is not None, f"{binary} (scripts/deps.sh libvirt)")
    require(version in built_versions(), f"patched QEMU {version} (run `make qemu`)")
    if mode is Mode.SUPERVISE:
        require(is_runnable(stock_source(version)), f"stock QEMU {version} (run `make qemu`)")
    require(guest_available(), "the guest kernel and initramfs (run `make guest`)")
    were_running = {d: running_pid(d) for d in ("libvirtd", "virtlogd")}

    result = run_demo(
        DemoOptions(qemu_version=version, supervise=mode is Mode.SUPERVISE, workdir=WORKDIR)
    )

    steps = {s.name: s for s in result.steps}
    assert result.ok, result.to_json()
    assert result.mode == mode
    assert result.qemu_user == "libvirt-qemu"
    assert result.lost == 0
    assert result.records_written > 0
    assert result.records_verified == result.records_written
    for name in ("snapshot", "blockcopy --pivot", "snapshot 2 (for blockpull)"):
        assert steps[name].image_requests > 0, name
    assert steps["start"].image_requests >= 2  # the image, read-only then read-write
    control = "supervisor" if mode is Mode.SUPERVISE else "hook"
    assert "Permission denied" in steps[f"start without the {control} (must fail)"].detail
    assert "Permission denied" in steps["snapshot into an ungranted directory (must fail)"].detail
    assert result.broker_requests == sum(s.broker_requests for s in result.steps)
    assert result.image_requests == sum(s.image_requests for s in result.steps)
    if mode is Mode.SUPERVISE:
        # every open is served: libraries and firmware too, not only the images
        assert steps["start"].broker_requests >= steps["start"].image_requests + 10
        assert "Seccomp filter mode" in steps["start"].detail
    # only what the demo started is stopped; what was running is still running
    for daemon, pid in were_running.items():
        assert running_pid(daemon) == pid, daemon
