"""The fd-set oracle's rewritten command lines, pinned byte for byte (qemu-img, no QEMU).

``data/fdset_rewrite_pins.json`` holds what ``rewrite_args`` wrote for every
built-in attachment of a three-layer chain before the option strings moved
to ``testbed.qemu.commandline``; they must not change by accident.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.compare.runners.fdset import Libvirt, rewrite_args
from testbed.compare.runners.setup import Binaries, Setup
from testbed.compare.scenarios import scenario
from testbed.pytest_plugin import require

PINS = Path(__file__).parent / "data" / "fdset_rewrite_pins.json"
ATTACHES = ("drive", "drive-device", "blockdev", "json", "snapshot-on", "file-node", "cdrom")


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    require(shutil.which("qemu-img") is not None, "qemu-img")
    for cmd in (
        "qemu-img create -q -f raw base.raw 4M",
        "qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2",
        "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2",
    ):
        subprocess.run(cmd, shell=True, check=True, cwd=tmp_path, timeout=60)
    return tmp_path


def _rewritten(root: Path) -> dict[str, list[str]]:
    out = {}
    for attach in (*ATTACHES, "snapshot"):
        for options in ({}, {"read_only": True}, {"cache_direct": True}):
            sc = scenario("qcow2-chain1", attach, ("read",), **options)
            sc = dataclasses.replace(sc, main="top.qcow2", format="qcow2")
            for version in ("7.2", "10.0"):
                b = Binaries(patched=Path("/x"), stock=Path("/x"), version=version)
                setup = Setup(scenario=sc, image=None, root=root, logs=root, binaries=b)
                args = rewrite_args(Libvirt(setup), setup.args())
                key = f"{attach} {sorted(options)} {version}"
                out[key] = [a.replace(str(root), "$D") for a in args]
    return out


def test_rewritten_command_lines_are_unchanged(chain: Path) -> None:
    want = json.loads(PINS.read_text())
    got = _rewritten(chain)
    assert set(got) == set(want)
    for key, args in want.items():
        assert got[key] == args, key
