"""The broker polls for a while after an answer (--poll-us), never when pinned to one CPU.

Witnessed by the loop thread's own CPU time (``/proc/self/task/TID/schedstat``):
polling burns the window's CPU, sleeping burns none.  The window is made long
(50 ms) so that the figures are far apart on a loaded machine too.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from testbed.broker import Broker, Policy
from testbed.pytest_plugin import require
from testbed.transport import HookClient

WINDOW_US = 50_000


def _loop_cpu_ns(broker: Broker) -> int:
    assert broker._thread is not None and broker._thread.native_id is not None
    stat = Path(f"/proc/self/task/{broker._thread.native_id}/schedstat").read_text()
    return int(stat.split()[0])


@pytest.mark.parametrize(
    ("poll_us", "pinned", "polls"),
    [(WINDOW_US, False, True), (WINDOW_US, True, False), (0, False, False)],
    ids=["polls", "pinned-alone", "off"],
)
def test_the_loop_polls_only_where_it_can_help(
    grant_dir: Path, poll_us: int, pinned: bool, polls: bool
) -> None:
    cpus = os.sched_getaffinity(0)
    require(len(cpus) > 1, "two usable CPUs")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if pinned:  # the loop thread inherits the mask of the thread that starts it
        os.sched_setaffinity(0, {min(cpus)})
    try:
        broker = Broker(Policy.from_grants(ro=[grant_dir]), poll_us=poll_us)
        broker.add_connection(ours)
        broker.start()
    finally:
        os.sched_setaffinity(0, cpus)
    client = HookClient(theirs, timeout=10)
    try:
        os.close(client.open(str(grant_dir / "disk.img"), os.O_RDONLY))
        c0 = _loop_cpu_ns(broker)
        time.sleep(2 * WINDOW_US / 1e6)
        c1 = _loop_cpu_ns(broker)
        time.sleep(2 * WINDOW_US / 1e6)
        c2 = _loop_cpu_ns(broker)
        # still serving after the window, and asleep once it is over
        os.close(client.open(str(grant_dir / "disk.img"), os.O_RDONLY))
    finally:
        client.close()
        broker.stop()
    window_ms, after_ms = (c1 - c0) / 1e6, (c2 - c1) / 1e6
    if polls:
        assert window_ms > WINDOW_US / 1000 / 5, f"polled only {window_ms:.1f} ms of CPU"
    else:
        assert window_ms < 5, f"{window_ms:.1f} ms of CPU while it should sleep"
    assert after_ms < 5, f"{after_ms:.1f} ms of CPU after the window"
