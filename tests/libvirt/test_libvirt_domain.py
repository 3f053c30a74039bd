"""The domain XML and its policy, written side by side."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from testbed.broker import Access, Policy
from testbed.errors import LibvirtError
from testbed.libvirt.domain import DomainConfig, define, domain_xml, files_for


def config(tmp_path: Path, **kw: object) -> DomainConfig:
    base: dict[str, object] = {
        "name": "vm1",
        "emulator": Path("/opt/testbed/bin/qemu-7.2-hook"),
        "kernel": Path("/opt/testbed/guest/vmlinuz"),
        "initrd": Path("/opt/testbed/guest/initrd.img"),
        "disk": tmp_path / "images" / "disk.qcow2",
        "create_dirs": (tmp_path / "images",),
        "peer_uid": 64055,
    }
    base.update(kw)
    return DomainConfig(**base)  # type: ignore[arg-type]


def test_the_xml_names_the_wrapper_the_disk_and_the_guest(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    dom = ET.fromstring(domain_xml(cfg))
    assert dom.get("type") == "qemu"
    assert dom.findtext("name") == "vm1"
    assert dom.findtext("devices/emulator") == str(cfg.emulator)
    assert dom.find("devices/disk/source").get("file") == str(cfg.disk)  # type: ignore[union-attr]
    assert dom.find("devices/disk/driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert dom.findtext("os/kernel") == str(cfg.kernel)
    assert dom.find("devices/serial").get("type") == "pty"  # type: ignore[union-attr]
    assert dom.find("devices/interface") is None


def test_the_policy_grants_the_create_dirs_to_the_qemu_uid(tmp_path: Path) -> None:
    files = define(config(tmp_path), tmp_path)
    assert files == files_for(tmp_path, "vm1")
    assert files.xml.name == "vm1.xml" and files.policy.name == "vm1.policy.toml"
    policy = Policy.from_toml(files.policy)
    assert policy.peer_uid == 64055
    assert [(g.path, g.access) for g in policy.grants] == [
        (str(tmp_path / "images"), Access.CREATE)
    ]


def test_a_path_with_quotes_survives_the_toml(tmp_path: Path) -> None:
    odd = tmp_path / 'we"ird\\dir'
    files = define(config(tmp_path, create_dirs=(odd,)), tmp_path)
    assert Policy.from_toml(files.policy).grants[0].path == str(odd)


@pytest.mark.parametrize("name", ["", "-x", "a/b", "a b", "x" * 65, "é"])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(LibvirtError, match="domain name"):
        config(tmp_path, name=name)


def test_relative_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(LibvirtError, match="relative"):
        config(tmp_path, disk=Path("disk.qcow2"))


@pytest.mark.parametrize("supervise", [False, True])
def test_define_from_the_command_line_picks_the_wrapper_and_grants(
    tmp_path: Path, supervise: bool
) -> None:
    from testbed.cli import main

    disk = tmp_path / "disk.qcow2"
    argv = ["libvirt", "define", "vm1", "--disk", str(disk), "--dir", str(tmp_path)]
    assert main([*argv, *(["--supervise"] if supervise else [])]) == 0
    xml = ET.fromstring((tmp_path / "vm1.xml").read_text())
    mode = "supervise" if supervise else "hook"
    assert xml.findtext("devices/emulator") == f"/opt/testbed/bin/qemu-7.2-{mode}"
    policy = Policy.from_toml(tmp_path / "vm1.policy.toml")
    read_only = {g.path for g in policy.grants if g.access == Access.RO}
    # supervised, QEMU's own reads of -kernel and -initrd are opens the supervisor serves
    kernel_files = {"/opt/testbed/guest/vmlinuz", "/opt/testbed/guest/initrd.img"}
    assert read_only == (kernel_files if supervise else set())
    assert {g.path for g in policy.grants if g.access == Access.CREATE} == {str(tmp_path)}
