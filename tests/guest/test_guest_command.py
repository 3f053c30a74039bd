"""``testbed boot`` argument handling and the build output (no QEMU needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.cli import main
from testbed.errors import GuestUsageError
from testbed.guest.artifacts import GUEST_DIR, guest_available
from testbed.guest.boot import BootOptions, run_boot
from testbed.pytest_plugin import require


def test_boot_rejects_unknown_format(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["boot", "--format", "qed"])
    assert info.value.code == 2
    assert "invalid choice: 'qed'" in capsys.readouterr().err


def test_boot_rejects_snapshot_of_vvfat(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["boot", "--format", "vvfat", "--snapshot"]) == 2
    assert "needs a writable image format" in capsys.readouterr().err


@pytest.mark.guest
def test_guest_build_loads_modules_after_their_dependencies() -> None:
    require(guest_available(), "the guest (run `make guest`)")
    info = json.loads((GUEST_DIR / "info.json").read_text())
    order = info["modules"]
    for before, after in (
        ("virtio_ring", "virtio_pci"),
        ("virtio", "virtio_blk"),
        ("virtio_pci_modern_dev", "virtio_pci"),
        ("fat", "vfat"),
    ):
        assert order.index(before) < order.index(after), order
    assert (GUEST_DIR / "modules.load").read_text().split() == order


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # --sandbox alone is the mount namespace, which the supervisor does not combine with
        (["--format", "raw", "--supervise", "--sandbox"], "not namespace"),
        (["--format", "raw", "--supervise", "--sandbox", "namespace"], "not namespace"),
        (["--format", "raw", "--kill-broker-at", "37"], "between 0 and 36"),
        (["--format", "raw", "--kill-broker-at", "-1"], "--kill-broker-at -1"),
        (["--format", "vvfat", "--kill-broker-at", "3"], "no vvfat"),
        (["--format", "raw", "--kill-broker-at", "3", "--snapshot"], "--snapshot"),
        (["--format", "raw", "--kill-broker-at", "3", "--no-hook"], "needs the hook"),
        (["--format", "raw", "--kill-broker-at", "3", "--supervise"], "needs the hook"),
    ],
)
def test_boot_rejects_bad_combinations(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["boot", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--qemu-version", "9.9"], "invalid choice: '9.9'"),
        (["--sandbox", "chroot"], "invalid choice: 'chroot'"),
    ],
)
def test_boot_rejects_unknown_choices(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["boot", "--format", "raw", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_boot_options_are_a_guest_usage_error_before_anything_starts(tmp_path: Path) -> None:
    opts = BootOptions(fmt="vvfat", workdir=tmp_path, snapshot=True)
    with pytest.raises(GuestUsageError, match="--snapshot needs a writable image format"):
        run_boot(opts)
    assert issubclass(GuestUsageError, ValueError)  # what `testbed boot` catches for exit 2
    assert list(tmp_path.iterdir()) == []  # no image, no log: nothing started
