"""How a guest boot confines QEMU: a mount namespace, or Landlock (with the supervisor or not).

Three ways to keep QEMU off its images, each wrapping the machine's command line:

* ``namespace``: the image directory is an empty tmpfs in QEMU's own mount
  namespace (``MachineConfig.hide_dirs``); only the hook reaches it;
* ``landlock`` with the hook (the patched QEMU): ``testbed supervise
  --landlock-only`` confines QEMU with a Landlock ruleset that grants
  nothing on the images, and serves no opens: the broker on
  ``-open-hook-fd`` does;
* ``landlock`` with ``supervise`` (a stock QEMU, no patch): ``testbed
  supervise --landlock`` serves every open of QEMU under the policy and
  confines it alike.

QEMU reads ``-kernel`` and ``-initrd`` with plain open(), not qemu_open, so
the hook never sees them: under Landlock alone they must be in the ruleset
(a system profile extended with the guest's directory); under the
supervisor they are opens it serves (read-only grants in its policy).  The
same holds for a QEMU built outside /usr (10.0): its prefix (modules,
keymaps, firmware) is granted read-only.  The serial console and QMP are
socket pairs inherited as descriptors, which Landlock does not restrict.
"""

from __future__ import annotations

import dataclasses
from enum import StrEnum
from importlib import resources
from pathlib import Path

from testbed.broker import Policy
from testbed.qemu import MachineConfig
from testbed.supervise.machine import supervise_wrapper
from testbed.supervise.profile import DEFAULT_PROFILE


class Sandbox(StrEnum):
    NAMESPACE = "namespace"
    LANDLOCK = "landlock"


def qemu_prefix(binary: Path) -> Path | None:
    """The install prefix of a QEMU built outside /usr (``PREFIX/bin/qemu-...``), else None."""
    real = binary.resolve()
    if real.parent.name != "bin" or real.is_relative_to("/usr"):
        return None
    return real.parent.parent


def extended_profile(workdir: Path, read_only: tuple[Path, ...]) -> Path:
    """The built-in system profile plus read-only grants on ``read_only``; the file written."""
    shipped = resources.files("testbed.supervise") / "profiles" / f"{DEFAULT_PROFILE}.toml"
    text = shipped.read_text()
    for path in read_only:
        text += f'\n[[grant]]\npath = "{path}"\naccess = "ro"\n'
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "landlock-profile.toml"
    out.write_text(text)
    return out


def landlock_only(
    config: MachineConfig, *, workdir: Path, read_only: tuple[Path, ...]
) -> MachineConfig:
    """``config`` confined by Landlock (nothing on the images) with no opens served."""
    wrapper = supervise_wrapper(
        Policy.from_grants(),
        workdir=workdir,
        landlock_only=True,
        exec_paths=(config.binary,),
        profile=extended_profile(workdir, read_only),
    )
    return dataclasses.replace(config, wrapper=wrapper + config.wrapper)
