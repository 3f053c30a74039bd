"""``virsh`` against ``qemu:///system``, each call with a timeout and a clear error."""

from __future__ import annotations

import logging
import shutil
import subprocess

from testbed.errors import LibvirtError

log = logging.getLogger(__name__)

URI = "qemu:///system"


def virsh_path() -> str:
    path = shutil.which("virsh")
    if path is None:
        raise LibvirtError("virsh is not installed (scripts/deps.sh libvirt)")
    return path


def virsh(*args: str, timeout: float = 60.0, uri: str = URI) -> str:
    """Run ``virsh -c URI ARGS``; its stdout, or :class:`LibvirtError` with what it said."""
    argv = [virsh_path(), "-q", "-c", uri, *args]
    log.debug("running %s", " ".join(argv))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise LibvirtError(f"virsh {' '.join(args)}: no answer in {timeout:g}s", argv=argv) from err
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip()).removeprefix("error: ")
        raise LibvirtError(
            f"virsh {args[0]} failed: {said}", argv=argv, output=proc.stdout + proc.stderr
        )
    return proc.stdout


def domain_exists(name: str, *, uri: str = URI) -> bool:
    try:
        virsh("domstate", name, timeout=30, uri=uri)
    except LibvirtError:
        return False
    return True


def disk_sources(name: str, *, uri: str = URI) -> dict[str, str]:
    """target -> source of the domain's disks (``virsh domblklist``)."""
    out = virsh("domblklist", name, timeout=30, uri=uri)
    pairs: dict[str, str] = {}
    for line in out.splitlines():
        words = line.split(None, 1)
        if len(words) == 2:
            pairs[words[0]] = words[1].strip()
    return pairs
