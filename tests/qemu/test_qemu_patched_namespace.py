"""In a mount namespace that hides the images, only the hook can reach them."""

from __future__ import annotations

import subprocess

import pytest
from qemu_images import PATTERN, Images

from testbed.errors import LaunchError
from testbed.pytest_plugin import missing
from testbed.qemu.fixtures import MachineFactory

pytestmark = pytest.mark.qemu


@pytest.fixture(autouse=True)
def _need_namespaces() -> None:
    if subprocess.run(["unshare", "--mount", "true"], check=False).returncode != 0:
        missing("cannot create mount namespaces here (unshare --mount failed; needs root)")


def test_hidden_images_open_through_the_hook(patched_qemu: MachineFactory, images: Images) -> None:
    vm = patched_qemu(
        "-drive", f"file={images.qcow2},format=qcow2,if=none,id=drive0", hide_dirs=(images.dir,)
    )
    assert "Pattern verification failed" not in vm.qemu_io("drive0", f"read -P {PATTERN:#x} 0 4096")
    overlay = images.dir / "snap.qcow2"
    vm.qmp(
        "blockdev-snapshot-sync", device="drive0", **{"snapshot-file": str(overlay)}, format="qcow2"
    )
    assert overlay.exists()  # made by the broker, outside the namespace


def test_hidden_images_cannot_be_opened_without_the_hook(
    patched_qemu: MachineFactory, images: Images
) -> None:
    with pytest.raises(LaunchError) as info:
        patched_qemu(
            "-drive",
            f"file={images.qcow2},format=qcow2,if=none,id=drive0",
            hook=False,
            hide_dirs=(images.dir,),
        )
    assert str(images.qcow2) in info.value.log
    assert "No such file or directory" in info.value.log
