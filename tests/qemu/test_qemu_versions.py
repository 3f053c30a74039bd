"""The version registry, qemu_binary() and ``testbed qemu info`` (builds only where named)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.errors import MissingBuildError, QemuVersionError, UnknownProgramError
from testbed.qemu import binaries, command
from testbed.qemu.binaries import (
    REPO_ROOT,
    cache_keys,
    is_runnable,
    open_hook_server_path,
    patched_qemu_path,
    qemu_binary,
)
from testbed.qemu.fixtures import require_binary
from testbed.qemu.versions import (
    VERSIONS,
    Kind,
    QemuVersion,
    parse_versions,
    shell_assignments,
)


@pytest.mark.parametrize("version", list(VERSIONS), ids=lambda v: f"qemu{v}")
def test_every_version_has_its_series(version: str) -> None:
    series = REPO_ROOT / "patches" / VERSIONS[version].series
    names = [
        ln.strip() for ln in (series / "series").read_text().splitlines() if ln.strip()[:1] != "#"
    ]
    names = [n for n in names if n]
    assert names, f"{series}/series lists no patch"
    for name in names:
        assert (series / name).is_file(), f"{series}/series names {name}, which is missing"
    assert (series / "README.md").is_file()


def test_the_series_are_the_same_patches_for_every_version() -> None:
    # patch for patch: the same files in the same order, whatever their port changed
    lists = {
        v: (REPO_ROOT / "patches" / e.series / "series").read_text() for v, e in VERSIONS.items()
    }
    patches = {
        v: [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
        for v, text in lists.items()
    }
    assert len({tuple(p) for p in patches.values()}) == 1, patches


def test_shell_assignments_survive_bash() -> None:
    tricky = QemuVersion(
        name="9.9",
        suite="sid",
        source_version="1:9.9+ds-1",
        series="9.9",
        meson="meson>=1.5,<2",
        configure_extra=("--disable-download", "--extra-cflags=-O1 -g"),
    )
    script = shell_assignments(tricky) + '\nprintf "%s|" "$QV_MESON" "${QV_CONFIGURE_EXTRA[@]}"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout == "meson>=1.5,<2|--disable-download|--extra-cflags=-O1 -g|"


def test_parse_versions_keeps_order_and_refuses_unknown_names() -> None:
    assert [v.name for v in parse_versions("10.0,7.2 10.0")] == ["10.0", "7.2"]
    assert [v.name for v in parse_versions("")] == list(VERSIONS)
    with pytest.raises(QemuVersionError, match=r"unknown QEMU version '8\.0' \(known: 7\.2"):
        parse_versions("7.2,8.0")


def test_qemu_binary_layout(tmp_path: Path) -> None:
    assert qemu_binary("7.2", "stock") == Path("/usr/bin/qemu-system-x86_64")
    assert qemu_binary("7.2", "stock", program="qemu-img") == Path("/usr/bin/qemu-img")
    root = tmp_path / "build" / "qemu"
    assert qemu_binary("10.0", Kind.STOCK, repo=tmp_path) == (
        root / "10.0" / "stock" / "bin" / "qemu-system-x86_64"
    )
    assert qemu_binary("10.0", "open-hook-server", repo=tmp_path) == (
        root / "10.0" / "patched" / "bin" / "open-hook-server"
    )
    assert qemu_binary("10.0", "patched", program="qemu-storage-daemon", repo=tmp_path) == (
        root / "10.0" / "patched" / "bin" / "qemu-storage-daemon"
    )
    # the old helpers are the default version's
    assert patched_qemu_path() == qemu_binary("7.2", "patched") == qemu_binary()
    assert open_hook_server_path() == qemu_binary("7.2", Kind.OPEN_HOOK_SERVER)


def test_qemu_binary_refuses_what_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(QemuVersionError, match="unknown QEMU binary kind 'patch'"):
        qemu_binary("10.0", "patch")
    with pytest.raises(QemuVersionError, match="unknown QEMU version"):
        qemu_binary("1.0")
    with pytest.raises(ValueError, match="unknown QEMU program 'qemu-system-arm'"):
        qemu_binary("10.0", program="qemu-system-arm")
    with pytest.raises(ValueError, match="not a program of kind stock"):
        qemu_binary("10.0", "stock", program="open-hook-server")
    with pytest.raises(MissingBuildError, match=r"make qemu QEMU_VERSIONS=10\.0") as info:
        qemu_binary("10.0", "stock", repo=tmp_path, must_exist=True)
    assert (info.value.version, info.value.kind) == ("10.0", "stock")


def test_cache_keys_differ_by_version_and_kind_and_are_stable() -> None:
    keys = cache_keys()
    assert set(keys) == {(v.name, k.value) for v in VERSIONS.values() for k in v.built_kinds}
    assert len(set(keys.values())) == len(keys)
    assert cache_keys() == keys


def _info(
    capsys: pytest.CaptureFixture[str], versions: str | None
) -> tuple[int, list[dict[str, object]]]:
    status = command.run_info(argparse.Namespace(qemu_version=versions, json=True))
    return status, json.loads(capsys.readouterr().out)


def test_info_json_lists_every_kind_and_fails_on_a_missing_build(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(binaries, "REPO_ROOT", tmp_path)  # a checkout with nothing built
    status, entries = _info(capsys, "10.0")
    assert status == 1
    assert [(e["version"], e["kind"], e["present"]) for e in entries] == [
        ("10.0", "patched", False),
        ("10.0", "stock", False),
        ("10.0", "open-hook-server", False),
    ]
    assert entries[0]["path"] == str(tmp_path / "build/qemu/10.0/patched/bin/qemu-system-x86_64")
    assert "qemu-img" in entries[0]["missing"]  # type: ignore[operator]


def test_info_json_describes_a_built_version(
    capsys: pytest.CaptureFixture[str], qemu_version: str
) -> None:
    for kind in Kind:
        require_binary(qemu_version, kind)
    status, entries = _info(capsys, qemu_version)
    assert status == 0
    by_kind = {e["kind"]: e for e in entries}
    assert set(by_kind) == {"patched", "stock", "open-hook-server"}
    for kind in ("patched", "stock"):
        assert f"version {qemu_version}." in str(by_kind[kind]["version_string"])
        tools = by_kind[kind]["tools"]
        assert isinstance(tools, dict) and set(tools) >= {"qemu-img", "qemu-io", "qemu-nbd"}
    assert by_kind["open-hook-server"]["version_string"] == ""


def test_qemu_run_uses_the_version_asked_for(qemu_version: str, tmp_path: Path) -> None:
    binary = require_binary(qemu_version, Kind.PATCHED)
    missing = tmp_path / "missing.raw"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "testbed",
            "qemu",
            "run",
            "--qemu-version",
            qemu_version,
            "--allow-ro",
            str(tmp_path),
            "--",
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-drive",
            f"file={missing},format=raw,if=none,id=d0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert f"testbed qemu run: QEMU {qemu_version} patched: {binary}" in done.stderr
    # QEMU asked the broker (granted directory, no such file) and stopped at startup
    assert f"Could not open '{missing}': No such file or directory" in done.stderr
    assert f"{missing} O_RDONLY|O_NONBLOCK -> No such file or directory" in done.stdout
    assert done.returncode == 1


def test_an_unknown_program_is_a_qemu_version_error_and_a_value_error() -> None:
    with pytest.raises(UnknownProgramError) as info:
        qemu_binary("10.0", program="qemu-system-arm")
    assert isinstance(info.value, QemuVersionError) and isinstance(info.value, ValueError)
    assert info.value.program == "qemu-system-arm"


def test_is_runnable_means_what_exec_would_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "tool"
    script.write_text("#!/bin/sh\n")
    assert not is_runnable(script)  # not executable
    script.chmod(0o755)
    assert is_runnable(script) and is_runnable(str(script))
    assert not is_runnable(tmp_path)  # a directory is no binary
    assert not is_runnable(tmp_path / "absent")
    # a bare name is looked up on PATH, as Machine.launch's exec would
    monkeypatch.setenv("PATH", str(tmp_path))
    assert is_runnable("tool")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert not is_runnable("tool")
