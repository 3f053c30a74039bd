"""The registries of ping-pong servers and QEMU transports, and the binary finder."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from testbed.bench import qemus
from testbed.bench.experiments import EXPERIMENTS
from testbed.bench.registry import Registry
from testbed.bench.servers import SERVERS, PingPong
from testbed.bench.transports import TRANSPORTS, Transport


def test_every_registered_part_loads_under_its_name_in_order() -> None:
    assert SERVERS.names()[:4] == ["broker", "python_floor", "open_hook_server", "c_limit"]
    assert [s.name for s in SERVERS] == SERVERS.names()
    assert TRANSPORTS.names()[:4] == ["path", "hook", "hook_c", "fdset"]
    assert {"seccomp", "seccomp_landlock"} <= set(TRANSPORTS.names())
    assert "seccomp" in SERVERS.names()
    assert [e.name for e in EXPERIMENTS] == EXPERIMENTS.names() == [
        "pingpong", "sweep", "handover", "blockdev", "startup", "snapshot", "storm",
    ]  # fmt: skip
    assert [t.name for t in TRANSPORTS] == TRANSPORTS.names()
    assert all(isinstance(t, Transport) for t in TRANSPORTS)
    assert all(isinstance(s, PingPong) for s in SERVERS)


def test_select_keeps_registration_order_and_refuses_unknown_names() -> None:
    assert [t.name for t in TRANSPORTS.select(["fdset", "path"])] == ["path", "fdset"]
    with pytest.raises(KeyError, match=r"no Transport .nfs. .*known: path, hook"):
        TRANSPORTS.select(["nfs"])


def fake_package(monkeypatch: pytest.MonkeyPatch, part: object) -> str:
    pkg = types.ModuleType("fakeparts")
    pkg.__path__ = []
    mod = types.ModuleType("fakeparts.one")
    mod.PART = part  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fakeparts", pkg)
    monkeypatch.setitem(sys.modules, "fakeparts.one", mod)
    return "fakeparts"


class Part:
    def __init__(self, name: str) -> None:
        self.name = name


def test_a_module_whose_part_is_of_the_wrong_kind_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reg: Registry[Part] = Registry(fake_package(monkeypatch, "not a part"), {"one": "one"}, Part)
    with pytest.raises(TypeError, match="PART is str, not Part"):
        reg.get("one")


def test_a_part_registered_under_another_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    reg: Registry[Part] = Registry(fake_package(monkeypatch, Part("two")), {"one": "one"}, Part)
    with pytest.raises(TypeError, match="named 'two', registered as 'one'"):
        reg.get("one")


def test_qemu_binaries_come_from_one_function_keyed_by_version() -> None:
    assert qemus.find_qemu(qemus.Build.STOCK).name == "qemu-system-x86_64"
    assert "build" in qemus.find_qemu(qemus.Build.PATCHED, "7.2").parts
    # every registered version, through testbed.qemu.qemu_binary
    assert qemus.find_qemu(qemus.Build.PATCHED, "10.0").parts[-4:-2] == ("10.0", "patched")
    assert qemus.versions() == ["7.2", "10.0"]
    with pytest.raises(KeyError, match=r"no QEMU 9\.9 known to the benchmark"):
        qemus.find_qemu(qemus.Build.PATCHED, "9.9")


def test_a_transport_whose_binary_is_missing_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from testbed.qemu import qemu_binary as real

    missing_qemu = tmp_path / "build" / "qemu" / "bin" / "qemu-system-x86_64"
    monkeypatch.setattr(
        qemus,
        "qemu_binary",
        lambda version, kind: missing_qemu if kind == "patched" else real(version, kind),
    )
    why = TRANSPORTS.get("hook").unavailable("7.2")
    assert why == f"patched QEMU 7.2 {missing_qemu} is not built (make qemu)"
    assert TRANSPORTS.get("hook_c").unavailable("7.2") is not None
    assert TRANSPORTS.get("hook").unavailable("9.9") == (
        "no QEMU 9.9 known to the benchmark (known: 7.2, 10.0)"
    )
