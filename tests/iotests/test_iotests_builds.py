"""Where the builds and the suite's tools come from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.errors import IotestsError
from testbed.iotests import builds
from testbed.iotests.builds import QemuBuild, find_builds, suite_tools, upstream_version


def exe(path: Path, version_line: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    path.chmod(0o755)
    return path


def make_build(root: Path, name: str, source_version: str, tools: bool = False) -> Path:
    d = root / "build" / name
    exe(d / "bin" / "qemu-system-x86_64")
    (d / "info.json").write_text(json.dumps({"source_version": source_version}))
    if tools:
        for n in builds.TOOL_NAMES:
            exe(d / "bin" / n)
    return d


def test_upstream_version() -> None:
    assert upstream_version("1:7.2+dfsg-7+deb12u18") == "7.2"
    assert upstream_version("1:10.0.13+ds-0+deb13u1") == "10.0"
    with pytest.raises(IotestsError, match="'garbage'"):
        upstream_version("garbage")


def test_find_builds_one_per_version_in_version_order(tmp_path: Path) -> None:
    make_build(tmp_path, "qemu/10.0/patched", "1:10.0.13+ds-0+deb13u1")
    make_build(tmp_path, "qemu/9.2/patched", "1:9.2.0")
    (tmp_path / "build" / "qemu" / "8.0" / "patched").mkdir(parents=True)  # no info.json
    make_build(tmp_path, "qemu", "1:7.2+dfsg-7+deb12u18")  # the one-version layout
    assert [b.version for b in find_builds(tmp_path)] == ["7.2", "9.2", "10.0"]


def test_find_builds_in_named_dirs_only(tmp_path: Path) -> None:
    d = make_build(tmp_path, "elsewhere", "1:10.0.13+ds-0+deb13u1")
    make_build(tmp_path, "qemu", "1:7.2+dfsg-7+deb12u18")
    assert [b.build_dir for b in find_builds(tmp_path, dirs=[d])] == [d]
    with pytest.raises(IotestsError, match="no patched QEMU build"):
        find_builds(tmp_path, dirs=[tmp_path / "build"])


def test_stock_sibling_of_a_versioned_build(tmp_path: Path) -> None:
    d = make_build(tmp_path, "qemu/10.0/patched", "1:10.0.13+ds-0+deb13u1")
    b = QemuBuild("10.0", "1:10.0.13+ds-0+deb13u1", d)
    # no unpatched sibling (and no Debian binary of 10.0): the build's own emulator,
    # which opens as stock QEMU does without -open-hook-fd
    assert builds.stock_emulator(b) == b.system_emulator
    stock = exe(tmp_path / "build" / "qemu" / "10.0" / "stock" / "bin" / "qemu-system-x86_64")
    assert builds.stock_emulator(b) == stock


def test_debian_qemu_without_qtest_is_not_the_supervised_binary() -> None:
    """Debian's 7.2 has no qtest accelerator; the suite's Python tests all need it."""
    from testbed.pytest_plugin import require
    from testbed.qemu.binaries import STOCK_QEMU

    require(STOCK_QEMU.exists(), f"Debian's QEMU {STOCK_QEMU} (apt-get install qemu-system-x86)")
    assert builds.has_qtest(STOCK_QEMU) is False


def test_tools_of_the_build_win(tmp_path: Path) -> None:
    d = make_build(tmp_path, "qemu-10.0", "1:10.0.13+ds-0+deb13u1", tools=True)
    t = suite_tools(QemuBuild("10.0", "1:10.0.13+ds-0+deb13u1", d))
    assert t.qemu_img == d / "bin" / "qemu-img"
    assert t.env()["QSD_PROG"] == str(d / "bin" / "qemu-storage-daemon")


def test_system_tools_only_of_the_same_source_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = tmp_path / "usr-bin"
    for n in builds.TOOL_NAMES:
        exe(system / n, f"{n} version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18+b3)")
    monkeypatch.setattr(builds, "SYSTEM_BIN", system)
    d = make_build(tmp_path, "qemu", "1:7.2+dfsg-7+deb12u18")
    assert suite_tools(QemuBuild("7.2", "1:7.2+dfsg-7+deb12u18", d)).qemu_io == system / "qemu-io"
    d10 = make_build(tmp_path, "qemu-10.0", "1:10.0.13+ds-0+deb13u1")
    with pytest.raises(IotestsError, match=r"qemu-img.*not built from source 1:10\.0\.13"):
        suite_tools(QemuBuild("10.0", "1:10.0.13+ds-0+deb13u1", d10))


def test_lay_out_copies_the_suite_once_and_is_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from testbed.iotests.runner import lay_out

    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "cache" / "qemu-src" / "1_7.2+dfsg-7+deb12u18"
    (src / "tests" / "qemu-iotests").mkdir(parents=True)
    (src / "tests" / "qemu-iotests" / "check").write_text("#!/usr/bin/env python3\n")
    (src / "python" / "qemu").mkdir(parents=True)
    b = QemuBuild("7.2", "1:7.2+dfsg-7+deb12u18", make_build(tmp_path, "qemu", "1:7.2"))
    monkeypatch.chdir(tmp_path)
    layout = lay_out(b, Path("work"))  # relative, as `--work build/x` gives it
    assert layout.iotests.is_absolute() and (layout.iotests / "check").is_file()
    assert (layout.root / "tree" / "python" / "qemu").is_dir()
    (layout.iotests / "left-by-a-run").write_text("")
    lay_out(b, Path("work"))  # same source version: not copied again
    assert (layout.iotests / "left-by-a-run").exists()
    with pytest.raises(IotestsError, match="no source tree"):
        lay_out(QemuBuild("10.0", "1:10.0.13+ds-0+deb13u1", b.build_dir), Path("work"))
