"""``testbed libvirt install``: put what libvirt's QEMU user runs where it can run it.

libvirt drops to ``libvirt-qemu`` before it runs the emulator, and the
build cache and the virtual environment may live under a 0700 ``/root``.
So the install copies, into a root-owned, world-readable prefix
(``/opt/testbed`` by default):

``qemu/<version>/qemu-system-x86_64``  each built patched QEMU
``qemu/<version>/stock/...``           the stock build, for versions whose stock
                                       QEMU is not Debian's world-readable
                                       ``/usr/bin`` binary (10.0; 7.2's is)
``lib/testbed/``                       this package's source (the wrapper
                                       needs only the standard library)
``bin/qemu-<version>-<mode>``          one wrapper per version and mode, a
                                       ``python3 -I`` script with both baked
                                       in (libvirt cleans the environment):
                                       ``hook`` runs the patched QEMU,
                                       ``supervise`` the stock one (written
                                       only when that is built)
``guest/vmlinuz``, ``guest/initrd.img`` the testbed guest (``make guest``)

Nothing else is touched.  Re-running it replaces the copies; a file whose
content is unchanged keeps its mtime, so libvirt's capability cache (keyed
on the emulator's ctime/mtime) is not invalidated for nothing.
"""

from __future__ import annotations

import filecmp
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import BuildError
from testbed.libvirt.emulator import Mode
from testbed.qemu import VERSIONS, Kind
from testbed.qemu import built_versions as _built_versions
from testbed.qemu import qemu_binary as _qemu_binary
from testbed.qemu.binaries import is_runnable

PREFIX = Path("/opt/testbed")
PACKAGE = Path(__file__).resolve().parents[1]

#: Versions of the patched QEMU this tree knows how to build (the version registry's).
KNOWN_VERSIONS = tuple(VERSIONS)


def qemu_binary(version: str, kind: str = "patched") -> Path:
    """The build of QEMU ``version`` of ``kind`` ("patched" or "stock"): the registry's."""
    if version not in KNOWN_VERSIONS:
        raise BuildError(f"QEMU {version} is not a known version ({', '.join(KNOWN_VERSIONS)})")
    if kind not in ("patched", "stock"):
        raise BuildError(f"unknown QEMU kind {kind!r} (patched or stock)")
    return _qemu_binary(version, kind)


def stock_source(version: str) -> Path:
    """The stock QEMU of ``version`` the install takes: Debian's binary, or the stock build."""
    system = VERSIONS[version].system_stock if version in VERSIONS else None
    return system if system is not None else qemu_binary(version, Kind.STOCK)


def built_versions() -> tuple[str, ...]:
    """The known versions whose patched build exists here."""
    return _built_versions()


@dataclass(frozen=True, kw_only=True)
class Installed:
    """Where the world-readable copies are."""

    prefix: Path = PREFIX

    def qemu(self, version: str) -> Path:
        return self.prefix / "qemu" / version / "qemu-system-x86_64"

    def stock_qemu(self, version: str) -> Path:
        """The stock QEMU the ``supervise`` wrapper runs: Debian's own, or a copy."""
        system = VERSIONS[version].system_stock if version in VERSIONS else None
        if system is not None:
            return system
        return self.prefix / "qemu" / version / "stock" / "qemu-system-x86_64"

    def mode_qemu(self, version: str, mode: Mode) -> Path:
        """The QEMU the wrapper of ``mode`` execs."""
        return self.stock_qemu(version) if mode is Mode.SUPERVISE else self.qemu(version)

    def wrapper(self, version: str, mode: Mode = Mode.HOOK) -> Path:
        return self.prefix / "bin" / f"qemu-{version}-{mode}"

    @property
    def lib(self) -> Path:
        return self.prefix / "lib"

    @property
    def kernel(self) -> Path:
        return self.prefix / "guest" / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.prefix / "guest" / "initrd.img"


WRAPPER = """\
#!/usr/bin/python3 -I
# Made by `testbed libvirt install`: libvirt's <emulator> for QEMU {version}, mode {mode}.
import sys
sys.path.insert(0, {lib!r})
from testbed.libvirt.emulator import run
sys.exit(run(sys.argv, qemu={qemu!r}, mode={mode!r}))
"""


def _chmod(path: Path, mode: int) -> None:
    # Only when it differs: chmod moves the ctime, and libvirt re-probes an
    # emulator whose ctime moved (25 s here, on every `virsh create`).
    if os.stat(path).st_mode & 0o7777 != mode:
        os.chmod(path, mode)


def _copy(src: Path, dst: Path, mode: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    _chmod(dst.parent, 0o755)
    if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
        _chmod(dst, mode)
        return
    tmp = dst.with_name(dst.name + ".new")
    shutil.copyfile(src, tmp)
    os.chmod(tmp, mode)
    os.replace(tmp, dst)


def _write(dst: Path, text: str, mode: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    _chmod(dst.parent, 0o755)
    if dst.is_file() and dst.read_text() == text:
        _chmod(dst, mode)
        return
    tmp = dst.with_name(dst.name + ".new")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, dst)


def _copy_package(dst: Path) -> None:
    for src in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in src.parts:
            continue
        _copy(src, dst / "testbed" / src.relative_to(PACKAGE), 0o644)
    for d in [dst, *sorted(p for p in (dst / "testbed").rglob("*") if p.is_dir())]:
        _chmod(d, 0o755)


def install(
    *,
    prefix: Path = PREFIX,
    versions: Sequence[str] | None = None,
    guest_dir: Path | None = None,
) -> Installed:
    """Copy the builds, the package, the guest and the wrappers under ``prefix``."""
    from testbed.guest.artifacts import find_guest

    where = Installed(prefix=prefix)
    chosen = tuple(versions) if versions else built_versions()
    if not chosen:
        raise BuildError("no patched QEMU is built (run `make qemu`)")
    prefix.mkdir(parents=True, exist_ok=True)
    _chmod(prefix, 0o755)
    _copy_package(where.lib)
    for version in chosen:
        src = qemu_binary(version)
        if not is_runnable(src):
            raise BuildError(f"patched QEMU {version} is not built at {src} (run `make qemu`)")
        _copy(src, where.qemu(version), 0o755)
        stock = stock_source(version)
        if stock != where.stock_qemu(version) and is_runnable(stock):
            _copy(stock, where.stock_qemu(version), 0o755)
        for mode in Mode:
            wrapper = where.wrapper(version, mode)
            qemu = where.mode_qemu(version, mode)
            if not is_runnable(qemu):
                # no stock build: no supervise wrapper (the demo then says what is missing)
                wrapper.unlink(missing_ok=True)
                continue
            text = WRAPPER.format(
                version=version, mode=str(mode), lib=str(where.lib), qemu=str(qemu)
            )
            _write(wrapper, text, 0o755)
    guest = find_guest(guest_dir)
    _copy(guest.kernel, where.kernel, 0o644)
    _copy(guest.initrd, where.initrd, 0o644)
    return where
