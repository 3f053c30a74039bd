"""scripts/build-qemu.sh without building: the private deb-src entries, keys, argument errors."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from testbed.pytest_plugin import require
from testbed.qemu.binaries import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "build-qemu.sh"

ONE_LINE = """\
deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://m.example/debian bookworm main contrib
deb http://m.example/debian-security bookworm-security main
# deb http://commented.example/debian bookworm main
deb http://other.example/debian sid main
deb-src http://m.example/debian bookworm main
"""

DEB822 = """\
Types: deb
URIs: http://deb.example/debian http://deb2.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no
"""


def derived(tmp_path: Path, to: str) -> list[str]:
    """private_sources of the real script, run where /etc/apt is our test directory."""
    require(os.geteuid() == 0 and shutil.which("unshare") is not None, "root and unshare(1)")
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text(ONE_LINE)
    (etc / "sources.list.d" / "debian.sources").write_text(DEB822)
    function = subprocess.run(
        ["sed", "-n", "/^private_sources()/,/^}/p", str(SCRIPT)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert function, "build-qemu.sh has no private_sources()"
    shell = f'mount --bind "$1" /etc/apt\n{function}\nprivate_sources bookworm "$2"\n'
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "bash", "-c", shell, "sh", str(etc), to],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return sorted(done.stdout.splitlines())


def test_trixie_deb_src_comes_from_the_systems_bookworm_entries(tmp_path: Path) -> None:
    assert derived(tmp_path, "trixie") == sorted(
        [
            "deb-src [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] "
            "http://m.example/debian trixie main contrib",
            "deb-src http://m.example/debian-security trixie-security main",
            "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
            "http://deb.example/debian trixie main",
            "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
            "http://deb.example/debian trixie-updates main",
            "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
            "http://deb2.example/debian trixie main",
            "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
            "http://deb2.example/debian trixie-updates main",
        ]
    )


def test_bookworm_deb_src_is_the_same_derivation(tmp_path: Path) -> None:
    lines = derived(tmp_path, "bookworm")
    assert len(lines) == 6
    assert all(" trixie" not in ln and ln.startswith("deb-src ") for ln in lines)
    assert not any("sid" in ln or "disabled" in ln or "commented" in ln for ln in lines)


def test_print_key_lists_every_version_and_kind_and_refuses_unknown_ones() -> None:
    done = subprocess.run(
        [str(SCRIPT), "--print-key"], capture_output=True, text=True, timeout=60, check=True
    )
    rows = [ln.split() for ln in done.stdout.splitlines()]
    assert [r[:2] for r in rows] == [["7.2", "patched"], ["10.0", "patched"], ["10.0", "stock"]]
    only = subprocess.run(
        [str(SCRIPT), "--print-key"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "QEMU_VERSIONS": "10.0"},
    )
    assert [ln.split()[:2] for ln in only.stdout.splitlines()] == [
        ["10.0", "patched"],
        ["10.0", "stock"],
    ]
    bad = subprocess.run(
        [str(SCRIPT), "--print-key", "9.1"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode != 0
    assert "unknown QEMU version '9.1'" in bad.stderr
