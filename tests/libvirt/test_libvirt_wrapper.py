"""The installed wrapper with the patched QEMU, without libvirt: probes pass
through, a domain without a broker does not start, and a killed QEMU takes
its broker with it."""

from __future__ import annotations

import os
import secrets
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.broker import read_audit
from testbed.guest.artifacts import guest_available
from testbed.libvirt.install import Installed, built_versions, install
from testbed.pytest_plugin import require

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    require(bool(built_versions()), "a patched QEMU build (run `make qemu`)")
    require(guest_available(), "the guest kernel and initramfs (run `make guest`)")
    return install(prefix=tmp_path_factory.mktemp("prefix"))


def test_install_is_world_readable(installed: Installed) -> None:
    for version in built_versions():
        for path in (installed.wrapper(version), installed.qemu(version)):
            assert path.stat().st_mode & 0o005 == 0o005, path
    assert (installed.lib / "testbed" / "libvirt" / "emulator.py").stat().st_mode & 0o004


def test_a_second_install_keeps_the_ctime(installed: Installed) -> None:
    # libvirt re-probes an emulator whose ctime moved (25 s each time here)
    version = built_versions()[0]
    before = (
        installed.wrapper(version).stat().st_ctime_ns,
        installed.qemu(version).stat().st_ctime_ns,
    )
    install(prefix=installed.prefix)
    after = (
        installed.wrapper(version).stat().st_ctime_ns,
        installed.qemu(version).stat().st_ctime_ns,
    )
    assert before == after


@pytest.mark.parametrize("version", built_versions() or ["7.2"])
def test_a_probe_reaches_qemu_untouched(installed: Installed, version: str) -> None:
    out = subprocess.run(
        [str(installed.wrapper(version)), "-version"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert f"QEMU emulator version {version}" in out.stdout


def test_a_domain_without_a_broker_does_not_start(installed: Installed) -> None:
    name = f"tb-nobroker-{secrets.token_hex(3)}"
    out = subprocess.run(
        [str(installed.wrapper(built_versions()[0])), "-name", f"guest={name}", "-machine", "none"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert f"no broker socket at /run/testbed/libvirt/{name}.sock" in out.stderr
    assert f"testbed libvirt serve {name}" in out.stderr


def test_killing_qemu_ends_its_broker(installed: Installed, tmp_path: Path) -> None:
    name = f"tb-kill-{secrets.token_hex(3)}"
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[[grant]]\npath = "{tmp_path}"\naccess = "rw"\n')
    audit = tmp_path / "audit.jsonl"
    serve = subprocess.Popen(
        [sys.executable, "-m", "testbed", "libvirt", "serve", name, "--policy", str(policy),
         "--audit", str(audit), "--qemu-user", "root", "--timeout", "30"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    qemu = None
    try:
        assert serve.stdout is not None
        assert select.select([serve.stdout], [], [], 30)[0], "serve did not start"
        assert serve.stdout.readline().startswith("serving")
        # an fd and a variable of our own, as libvirt passes its monitor fd and env
        keep_r, keep_w = os.pipe()
        wrapper = str(installed.wrapper(built_versions()[0]))
        qemu = subprocess.Popen(
            [wrapper, "-name", f"guest={name}",
             "-machine", "none", "-nodefaults", "-display", "none", "-S",
             "-drive", f"file={image},format=qcow2,if=none,id=d0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            pass_fds=(keep_r,), env={**os.environ, "TB_FROM_LIBVIRT": "yes"},
        )  # fmt: skip
        os.close(keep_r)
        os.close(keep_w)
        deadline = time.monotonic() + 30
        while not (audit.exists() and read_audit(audit)) and time.monotonic() < deadline:
            assert qemu.poll() is None, qemu.stderr.read() if qemu.stderr else ""
            time.sleep(0.1)
        assert read_audit(audit)[0].path == str(image)
        # the wrapper exec'd QEMU in its own place: no parent left over
        assert os.path.basename(os.readlink(f"/proc/{qemu.pid}/exe")) == "qemu-system-x86_64"
        # ... with argv[0], the descriptors and the environment it was given
        assert Path(f"/proc/{qemu.pid}/cmdline").read_bytes().split(b"\0")[0] == wrapper.encode()
        assert os.readlink(f"/proc/{qemu.pid}/fd/{keep_r}").startswith("pipe:")
        assert b"TB_FROM_LIBVIRT=yes" in Path(f"/proc/{qemu.pid}/environ").read_bytes().split(b"\0")
        assert serve.poll() is None
        qemu.send_signal(signal.SIGKILL)
        qemu.wait(10)
        assert serve.wait(10) == 0
    finally:
        for p in (qemu, serve):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
