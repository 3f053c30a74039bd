"""``testbed libvirt demo`` against Debian's libvirtd, for every built QEMU version.

Each run starts libvirtd and virtlogd if none are running and stops what it
started (about 15 s with a warm capability cache; the first probe of a new
emulator binary costs libvirt 25 to 50 s more).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from testbed.errors import LibvirtError
from testbed.guest.artifacts import guest_available
from testbed.libvirt.daemons import running_pid
from testbed.libvirt.demo import Demo, DemoOptions, DemoResult, DemoStep, run_demo
from testbed.libvirt.install import built_versions
from testbed.pytest_plugin import require

WORKDIR = Path("/var/lib/testbed/libvirt/tests")


def test_supervise_mode_says_it_is_not_available(tmp_path: Path) -> None:
    result = run_demo(DemoOptions(supervise=True, workdir=tmp_path))
    assert not result.ok
    assert result.mode == "supervise"
    assert result.error is not None and "not available" in result.error
    assert result.steps == ()


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
    assert set(result().as_dict()) >= {
        "steps", "records_written", "records_verified", "lost", "broker_requests", "qemu_user"
    }  # fmt: skip


@pytest.mark.libvirt
@pytest.mark.slow
@pytest.mark.parametrize("version", built_versions() or ["7.2"])
def test_demo_loses_nothing_with_qemu_unprivileged(version: str) -> None:
    for binary in ("libvirtd", "virtlogd", "virsh"):
        require(shutil.which(binary) is not None, f"{binary} (scripts/deps.sh libvirt)")
    require(version in built_versions(), f"patched QEMU {version} (run `make qemu`)")
    require(guest_available(), "the guest kernel and initramfs (run `make guest`)")
    were_running = {d: running_pid(d) for d in ("libvirtd", "virtlogd")}

    result = run_demo(DemoOptions(qemu_version=version, workdir=WORKDIR))

    steps = {s.name: s for s in result.steps}
    assert result.ok, result.as_dict()
    assert result.qemu_user == "libvirt-qemu"
    assert result.lost == 0
    assert result.records_written > 0
    assert result.records_verified == result.records_written
    for name in ("snapshot", "blockcopy --pivot", "snapshot 2 (for blockpull)"):
        assert steps[name].broker_requests > 0, name
    assert steps["start"].broker_requests >= 2  # the image, read-only then read-write
    assert "Permission denied" in steps["start without the hook (must fail)"].detail
    assert "Permission denied" in steps["snapshot into an ungranted directory (must fail)"].detail
    assert result.broker_requests == sum(s.broker_requests for s in result.steps)
    # only what the demo started is stopped; what was running is still running
    for daemon, pid in were_running.items():
        assert running_pid(daemon) == pid, daemon
