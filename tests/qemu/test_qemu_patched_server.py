"""The series' C example server (contrib/open-hook-server) serves the patched QEMU."""

from __future__ import annotations

from pathlib import Path

import pytest
from qemu_images import PATTERN, Images

from testbed.qemu import QMPCommandError
from testbed.qemu.fixtures import MachineFactory, require_binary
from testbed.qemu.versions import Kind

pytestmark = pytest.mark.qemu


def test_open_hook_server_grants_below_its_root(
    patched_qemu: MachineFactory, images: Images, tmp_path: Path, qemu_version: str
) -> None:
    server = require_binary(qemu_version, Kind.OPEN_HOOK_SERVER)
    outside = tmp_path / "outside.raw"
    outside.write_bytes(bytes(1 << 16))
    log = tmp_path / "server.log"
    vm = patched_qemu(
        "-drive", f"file={images.qcow2},format=qcow2,if=none,id=drive0", serve=False, launch=False
    )
    vm.start_open_hook_server(images.dir, log_path=log, server=server)
    vm.launch()
    assert "Pattern verification failed" not in vm.qemu_io("drive0", f"read -P {PATTERN:#x} 0 4096")
    with pytest.raises(QMPCommandError, match="Permission denied"):
        vm.qmp(
            "blockdev-add",
            driver="file",
            filename=str(outside),
            **{"node-name": "out", "read-only": True},
        )
    vm.shutdown()
    text = log.read_text()
    assert f'open "{images.qcow2}" O_RDONLY|O_NONBLOCK 0 -> granted' in text
    assert f'open "{images.raw}" O_RDONLY 0 -> granted' in text
    assert f'open "{outside}" O_RDONLY 0 -> Permission denied' in text
