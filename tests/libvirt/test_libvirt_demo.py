"""``testbed libvirt demo`` against Debian's libvirtd, for every built QEMU version.

Each run starts libvirtd and virtlogd if none are running and stops what it
started (about 15 s with a warm capability cache; the first probe of a new
emulator binary costs libvirt 25 to 50 s more).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from testbed.guest.artifacts import guest_available
from testbed.libvirt.daemons import running_pid
from testbed.libvirt.demo import DemoOptions, run_demo
from testbed.libvirt.install import built_versions
from testbed.pytest_plugin import require

WORKDIR = Path("/var/lib/testbed/libvirt/tests")


def test_supervise_mode_says_it_is_not_available(tmp_path: Path) -> None:
    result = run_demo(DemoOptions(supervise=True, workdir=tmp_path))
    assert not result.ok
    assert result.mode == "supervise"
    assert result.error is not None and "not available" in result.error
    assert result.steps == ()


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
