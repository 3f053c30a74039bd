"""FIFOs under the supervisor: served as open(2) would (QEMU's `exec:cat >FIFO` migrations).

QEMU's iotests 234 and 262 migrate through a FIFO: QEMU's shell runs
`cat FIFO` and `cat >FIFO`, each open waiting for the other end.  The
supervisor serves each open in a worker thread, so it can let them wait; a
single-threaded broker cannot (its gate opens FIFOs O_NONBLOCK).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def _supervise(tmp_path: Path, script: str, *flags: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "testbed", "supervise", "--allow-create", str(tmp_path), *flags]
    return subprocess.run(
        [*argv, "--", "/bin/sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def test_a_fifo_pipes_between_two_supervised_processes(tmp_path: Path, kernel: None) -> None:
    fifo = tmp_path / "fifo"
    done = _supervise(
        tmp_path,
        f"mkfifo {fifo}; cat {fifo} >{tmp_path}/out & echo through >{fifo}; wait",
        "--allow-devices",
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out").read_text() == "through\n"


def test_without_allow_devices_a_fifo_is_refused(tmp_path: Path, kernel: None) -> None:
    fifo = tmp_path / "fifo"
    done = _supervise(tmp_path, f"mkfifo {fifo}; echo x >{fifo}")
    assert done.returncode != 0
    assert "Permission denied" in done.stderr


def test_a_fifo_opener_nobody_meets_does_not_keep_the_supervisor(
    tmp_path: Path, kernel: None
) -> None:
    """The command exits while a child waits in a FIFO's open: the supervisor still ends."""
    fifo = tmp_path / "fifo"
    t0 = time.monotonic()
    done = _supervise(
        tmp_path, f"mkfifo {fifo}; (cat {fifo} >/dev/null &); sleep 0.5", "--allow-devices"
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - t0 < 30  # the supervisor's stop waits 30 s for a worker
