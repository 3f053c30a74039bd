"""``testbed boot --job``: commit, stream and mirror run while the guest writes; nothing is lost.

The boots need ``make guest`` and ``make qemu`` (skipped locally, failing
under CI=true without them); the argument checks and the event wait do not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from testbed.errors import QEMUError, WaitTimeout
from testbed.guest.artifacts import guest_available
from testbed.guest.boot import BootOptions, run_boot
from testbed.guest.jobs import wait_job
from testbed.pytest_plugin import require
from testbed.qemu import patched_qemu_path
from testbed.qemu.binaries import is_runnable


@pytest.mark.guest
@pytest.mark.slow
@pytest.mark.parametrize("job", ["commit", "stream", "mirror"])
def test_a_job_while_the_guest_writes_loses_nothing(job: str, tmp_path: Path) -> None:
    require(guest_available(), "the guest kernel and initramfs (run `make guest`)")
    require(is_runnable(patched_qemu_path()), f"patched QEMU {patched_qemu_path()}")
    # sandbox: the images reach QEMU only through the hook, reopens included
    opts = BootOptions(fmt="qcow2", workdir=tmp_path, job=job, records=60, sandbox=True, keep=True)
    result = run_boot(opts)
    assert result.ok, result.error
    assert result.records_written == 60 and result.lost == 0 and result.records_verified == 60
    assert result.job is not None and result.job["job"] == job
    names = [s.name for s in result.steps]
    # the job ran while the guest wrote: done (a mirror: in sync) before the writer was
    assert names.index("write") > names.index("mirror ready" if job == "mirror" else job)
    if job == "mirror":
        assert result.job["compare"] == "Images are identical."
        assert result.job["result"].endswith("mirror.qcow2")
    elif job == "commit":
        assert result.job["result"].endswith("disk.qcow2")
    else:
        assert result.job["result"].endswith("snap1.qcow2")


def test_job_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--job needs a writable image format"):
        run_boot(BootOptions(fmt="vvfat", workdir=tmp_path, job="commit"))
    with pytest.raises(ValueError, match="do not go together"):
        run_boot(BootOptions(fmt="raw", workdir=tmp_path, job="mirror", snapshot=True))
    with pytest.raises(ValueError, match="--job backup: not one of commit, stream, mirror"):
        run_boot(BootOptions(fmt="raw", workdir=tmp_path, job="backup"))


class _VM:
    def __init__(self, events: list[dict[str, Any]]) -> None:
        self._events = events

    def events(self) -> list[dict[str, Any]]:
        out, self._events = self._events, []
        return out


class _Session:
    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.vm = _VM(events)

    def drain(self, window: float = 0.2) -> None:
        """No console in this test."""


def test_the_wait_names_the_job_and_stops_when_the_job_ends() -> None:
    with pytest.raises(WaitTimeout, match="BLOCK_JOB_READY of block job 'job0'"):
        wait_job(_Session([]), "BLOCK_JOB_READY", timeout=0.1)  # type: ignore[arg-type]
    other = {"event": "BLOCK_JOB_READY", "data": {"device": "other"}}
    ended = {"event": "BLOCK_JOB_COMPLETED", "data": {"device": "job0", "error": "EIO"}}
    with pytest.raises(QEMUError, match=r"ended with BLOCK_JOB_COMPLETED \(EIO\)"):
        wait_job(_Session([other, ended]), "BLOCK_JOB_READY", timeout=5)  # type: ignore[arg-type]
    ready = {"event": "BLOCK_JOB_READY", "data": {"device": "job0"}}
    assert wait_job(_Session([other, ready]), "BLOCK_JOB_READY", timeout=5) is not None  # type: ignore[arg-type]
