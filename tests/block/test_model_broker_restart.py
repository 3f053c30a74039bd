"""The model's broker restart (patch 0007): a dead broker fails the hook, open-hook-set mends it."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from testbed.block.layer import BlockLayer
from testbed.block.monitor import ModelMachine
from testbed.block.opener import Opener
from testbed.broker import Broker, Policy, serve_socketpair
from testbed.errors import BlockError
from testbed.pytest_plugin import require
from testbed.transport import HookClient


@pytest.fixture
def image(tmp_path: Path) -> Path:
    require(subprocess.run(["which", "qemu-img"], capture_output=True).returncode == 0, "qemu-img")
    base = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    return base


def _broker(root: Path) -> tuple[Broker, HookClient]:
    broker, theirs = serve_socketpair(Policy.from_grants(create=[root]))
    return broker, HookClient(theirs, timeout=10)


def _snapshot(m: ModelMachine, root: Path, name: str) -> None:
    m.qmp("blockdev-snapshot-sync", device="drive0", **{"snapshot-file": str(root / name)})


def test_kill_fail_reattach_succeed(image: Path, tmp_path: Path) -> None:
    first, client = _broker(tmp_path)
    second = None
    try:
        m = ModelMachine(BlockLayer(client))
        m.launch(["-drive", f"file={image},format=qcow2,if=none,id=drive0"])
        _snapshot(m, tmp_path, "s1.qcow2")
        answered = len(first.records)
        assert m.qmp("query-open-hook") == {
            "state": "connected", "requests": answered, "failures": 0, "reattached": 0,
        }  # fmt: skip
        first.stop()  # the broker dies: its end of the socket is closed
        with pytest.raises(OSError) as caught:
            _snapshot(m, tmp_path, "s2.qcow2")
        # the probes meet the dead socket first; the create is refused at once
        assert caught.value.errno == errno.ENOTCONN
        assert str(tmp_path / "s2.qcow2") in str(caught.value)
        stats = m.qmp("query-open-hook")
        assert stats["state"] == "broken" and stats["requests"] == answered
        assert stats["failures"] >= 2
        assert "Broken pipe" in stats["last-error"] and "s2.qcow2" in stats["last-error"]
        assert not (tmp_path / "s2.qcow2").exists()
        failures = stats["failures"]
        with pytest.raises(OSError):  # still failed: refused at once, nothing sent
            _snapshot(m, tmp_path, "s2.qcow2")
        assert m.qmp("query-open-hook")["failures"] > failures
        second, client2 = _broker(tmp_path)
        m.pass_hook("broker2", client2)
        m.qmp("open-hook-set", fdname="broker2")
        _snapshot(m, tmp_path, "s2.qcow2")
        stats = m.qmp("query-open-hook")
        assert stats["state"] == "connected" and stats["reattached"] == 1
        assert stats["requests"] == answered + len(second.records)
        assert "last-error" in stats  # kept after a reattach, as in the patch
        m.layer.read("drive0", 0, 512)
        m.quit()
        # the trace is what the brokers saw, both together, in order
        traced = [(e.path, e.flags) for e in m.layer.trace]
        audited = [(r.path, r.flags) for r in [*first.records, *second.records]]
        assert traced == audited
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_first_failure_names_the_transport_errno(tmp_path: Path) -> None:
    broker, client = _broker(tmp_path)
    opener = Opener(client)
    (tmp_path / "f").write_bytes(b"x")
    broker.stop()
    with pytest.raises(OSError) as first:
        opener.qemu_open(str(tmp_path / "f"), 0)
    assert first.value.errno == errno.EPIPE
    with pytest.raises(OSError) as later:
        opener.qemu_open(str(tmp_path / "f"), 0)
    assert later.value.errno == errno.ENOTCONN
    assert opener.trace == []  # no broker saw either request


def test_open_hook_set_refusals(image: Path, tmp_path: Path) -> None:
    m = ModelMachine(BlockLayer())  # no hook: as QEMU without -open-hook-fd
    assert m.qmp("query-open-hook") == {"state": "none"}
    with pytest.raises(BlockError, match="not found"):
        m.qmp("open-hook-set", fdname="nope")
    broker, client = _broker(tmp_path)
    try:
        m.pass_hook("b", client)
        with pytest.raises(BlockError, match="not started with -open-hook-fd"):
            m.qmp("open-hook-set", fdname="b")
        with pytest.raises(BlockError, match="fdname"):
            m.qmp("open-hook-set")
        with pytest.raises(BlockError, match="invalid fdname"):
            m.pass_hook("1x", client)
    finally:
        broker.stop()
