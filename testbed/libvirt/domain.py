"""A libvirt domain for the testbed guest and its broker policy, written side by side.

:func:`domain_xml` is a pure function of a frozen :class:`DomainConfig`;
:func:`define` writes ``<dir>/<name>.xml`` and ``<dir>/<name>.policy.toml``.
The policy is what ``testbed libvirt serve NAME`` gives the domain's broker:
the user edits it, the wrapper never reads it (it runs as the QEMU user).

The domain is TCG (``type='qemu'``: nested KVM is unreliable here), machine
``pc``, direct kernel boot of the testbed guest, one virtio disk, the serial
console on a pty, and no network, USB, balloon or graphics.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from testbed.errors import LibvirtError

KERNEL_ARGS = "console=ttyS0 panic=-1 loglevel=4"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


@dataclass(frozen=True, kw_only=True)
class DomainConfig:
    """What :func:`domain_xml` needs."""

    name: str
    emulator: Path
    kernel: Path
    initrd: Path
    disk: Path
    disk_format: str = "qcow2"
    memory_mib: int = 256
    #: broker grants: directories where QEMU may create files, files it may write
    create_dirs: tuple[Path, ...] = field(default_factory=tuple)
    ro_paths: tuple[Path, ...] = field(default_factory=tuple)
    peer_uid: int | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        for what in ("emulator", "kernel", "initrd", "disk"):
            if not getattr(self, what).is_absolute():
                raise LibvirtError(f"domain {self.name}: {what} {getattr(self, what)} is relative")
        if self.memory_mib < 64:
            raise LibvirtError(f"domain {self.name}: {self.memory_mib} MiB is too little memory")


def check_name(name: str) -> str:
    """Domain names become file and socket names: letters, digits and ``_.+-`` only."""
    if not _NAME.fullmatch(name):
        raise LibvirtError(
            f"domain name {name!r}: use 1 to 64 letters, digits or _.+- (starting with a "
            "letter or digit)"
        )
    return name


def domain_xml(cfg: DomainConfig) -> str:
    """The domain XML (for ``virsh define`` or ``virsh create``)."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = cfg.name
    ET.SubElement(dom, "memory", unit="MiB").text = str(cfg.memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_, "kernel").text = str(cfg.kernel)
    ET.SubElement(os_, "initrd").text = str(cfg.initrd)
    ET.SubElement(os_, "cmdline").text = KERNEL_ARGS
    # Without <acpi/> libvirt 9.0 passes -no-acpi, which QEMU 10.0 no longer accepts.
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "destroy"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "emulator").text = str(cfg.emulator)
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type=cfg.disk_format, cache="writeback")
    ET.SubElement(disk, "source", file=str(cfg.disk))
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    ET.SubElement(devices, "controller", type="usb", model="none")
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    ET.SubElement(devices, "memballoon", model="none")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def policy_toml(cfg: DomainConfig) -> str:
    """The broker policy for the domain, in ``testbed broker --policy`` form."""
    lines = [
        f"# Broker policy for libvirt domain {cfg.name} (testbed libvirt serve {cfg.name}).",
        "# Every open QEMU asks for must fall under a grant; edit freely.",
    ]
    if cfg.peer_uid is not None:
        lines.append(f"peer_uid = {cfg.peer_uid}")
    for path in cfg.ro_paths:
        lines += ["", "[[grant]]", f"path = {_toml_str(str(path))}", 'access = "ro"']
    for path in cfg.create_dirs:
        lines += ["", "[[grant]]", f"path = {_toml_str(str(path))}", 'access = "create"']
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, kw_only=True)
class DomainFiles:
    xml: Path
    policy: Path


def files_for(directory: Path, name: str) -> DomainFiles:
    """Where ``define`` writes a domain's XML and policy (and ``serve`` reads the policy)."""
    check_name(name)
    return DomainFiles(xml=directory / f"{name}.xml", policy=directory / f"{name}.policy.toml")


def define(cfg: DomainConfig, directory: Path) -> DomainFiles:
    """Write the domain XML and its policy TOML side by side in ``directory``."""
    files = files_for(directory, cfg.name)
    directory.mkdir(parents=True, exist_ok=True)
    files.xml.write_text(domain_xml(cfg))
    files.policy.write_text(policy_toml(cfg))
    return files
