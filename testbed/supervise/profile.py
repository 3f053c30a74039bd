"""The system profile: what a supervised program may open besides its images.

A QEMU opens ld.so.cache and ~50 shared libraries, accelerator modules,
firmware, ``/proc`` and ``/sys`` files and a few ``/dev`` nodes before it
touches an image (DESIGN.md section 6).  The profile lists those as grants
in the broker's own TOML format, read-only except for the device nodes, plus
a ``[profile]`` table for what only the supervisor needs::

    [profile]
    description = "what it is for"
    proc_self = true          # the caller's own /proc/PID (and its tasks), read-only
    exec = ["/usr/bin/stdbuf"] # executables Landlock lets it run (the command's own
                              # binary and ELF interpreter are always added)
    command_prefix = true     # also bin/../etc/qemu and bin/../share/qemu of the
                              # command, read-only, when bin/.. is not /usr

    [[grant]]                 # exactly as in a broker policy file
    path = "/usr/lib"
    access = "ro"
    hardlinks = true

Profiles ship in ``testbed/supervise/profiles/NAME.toml``; ``--system-profile``
takes a NAME or a FILE.  The same profile feeds the Landlock ruleset (each
grant becomes a rule with matching rights), so ``--landlock-only`` shows what
the program could do alone.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from testbed.broker import Access, Grant, Policy
from testbed.errors import PolicyError
from testbed.supervise.landlock import FS

DEFAULT_PROFILE = "qemu"


@dataclass(frozen=True, kw_only=True)
class SystemProfile:
    name: str
    description: str
    #: The grants as written (lexical paths): an absent file under one answers ENOENT.
    grants: tuple[Grant, ...]
    #: The same grants with their paths' symlinks resolved: what the gate opens beneath.
    policy: Policy
    proc_self: bool = False
    exec: tuple[str, ...] = ()
    #: Grant the command's install prefix read-only (see :meth:`for_command`).
    command_prefix: bool = False
    source: str = ""

    def covers(self, path: str) -> bool:
        return any(g.covers(path) is not None for g in self.grants)

    def for_command(self, binary: str | Path) -> SystemProfile:
        """This profile, plus ``binary``'s own QEMU directories read-only if it asks for that.

        A QEMU built with a prefix (10.0's stock oracle) reads
        ``bin/../etc/qemu/qemu.conf`` and looks for data in
        ``bin/../share/qemu``; a refusal of qemu.conf is EACCES, which QEMU
        takes as fatal, where an absent file under a grant answers ENOENT.
        Only those two directories are granted, and only for a binary in a
        directory named ``bin`` outside ``/usr`` (a distribution's QEMU is
        described by the grants already): never the whole prefix, which for
        an arbitrary command could be ``/`` or a home directory.
        """
        real = Path(os.path.realpath(binary))
        prefix = real.parent.parent
        if not self.command_prefix or real.parent.name != "bin" or prefix == Path("/usr"):
            return self
        extra = tuple(
            Grant(path=str(prefix / sub), access=Access.RO, hardlinks=True)
            for sub in ("etc/qemu", "share/qemu")
            if not self.covers(str(prefix / sub))
        )
        if not extra:
            return self
        return dataclasses.replace(
            self,
            grants=(*self.grants, *extra),
            policy=dataclasses.replace(self.policy, grants=(*self.policy.grants, *extra)),
        )

    def landlock_rules(self) -> list[tuple[str, FS]]:
        """(path, rights) for each grant: read for ``ro``, also write (and device
        ioctls for grants that allow devices) for ``rw``, also creating for ``create``."""
        rules = []
        for g in self.grants:
            if not os.path.lexists(g.path):
                # Landlock needs an existing path; a missing one grants nothing and
                # opening beneath it fails with ENOENT before Landlock is asked.
                continue
            rights = FS.READ_FILE | FS.READ_DIR
            if g.access >= Access.RW:
                rights |= FS.WRITE_FILE | FS.TRUNCATE
                if g.devices:
                    rights |= FS.IOCTL_DEV
            if g.access >= Access.CREATE:
                rights |= FS.MAKE_REG
            rules.append((g.path, rights))
        for path in self.exec:
            rules.append((path, FS.EXECUTE | FS.READ_FILE))
        return rules


def builtin_profiles() -> list[str]:
    folder = resources.files("testbed.supervise") / "profiles"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str | Path = DEFAULT_PROFILE) -> SystemProfile:
    """A built-in profile by NAME, or a profile FILE (anything with a ``/`` or ``.toml``)."""
    text_name = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text_name or text_name.endswith(".toml"):
        source = text_name
        try:
            raw = Path(name_or_path).read_bytes()
        except OSError as err:
            raise PolicyError(f"cannot read system profile: {err.strerror}", source=source) from err
        name = Path(name_or_path).stem
    else:
        source = f"built-in system profile {text_name!r}"
        folder = resources.files("testbed.supervise") / "profiles"
        entry = folder / f"{text_name}.toml"
        if not entry.is_file():
            known = ", ".join(builtin_profiles())
            raise PolicyError(f"no such built-in system profile (known: {known})", source=source)
        raw = entry.read_bytes()
        name = text_name
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise PolicyError(f"not valid TOML: {err}", source=source) from err
    return profile_from_mapping(data, name=name, source=source)


def profile_from_mapping(data: dict[str, Any], *, name: str, source: str = "") -> SystemProfile:
    data = dict(data)
    head = data.pop("profile", {})
    if not isinstance(head, dict):
        raise PolicyError("'profile' must be a table", source=source)
    unknown = set(head) - {"description", "proc_self", "exec", "command_prefix"}
    if unknown:
        raise PolicyError(f"unknown keys in [profile]: {sorted(unknown)}", source=source)
    description = head.get("description", "")
    proc_self = head.get("proc_self", False)
    exec_paths = head.get("exec", [])
    command_prefix = head.get("command_prefix", False)
    if not isinstance(description, str):
        raise PolicyError("[profile] description must be a string", source=source)
    if not isinstance(proc_self, bool):
        raise PolicyError("[profile] proc_self must be true or false", source=source)
    if not isinstance(command_prefix, bool):
        raise PolicyError("[profile] command_prefix must be true or false", source=source)
    if not isinstance(exec_paths, list) or not all(
        isinstance(p, str) and os.path.isabs(p) for p in exec_paths
    ):
        raise PolicyError("[profile] exec must be a list of absolute paths", source=source)
    lexical = Policy.from_mapping(data, source=source)
    # The gate opens beneath each grant's root without following symlinks out
    # of it, so a grant is kept under its resolved name (/lib -> /usr/lib,
    # /etc/localtime -> /usr/share/zoneinfo/...).
    resolved = tuple(dataclasses.replace(g, path=os.path.realpath(g.path)) for g in lexical.grants)
    policy = Policy(
        grants=resolved,
        refuse_errno=lexical.refuse_errno,
        create_mode_mask=lexical.create_mode_mask,
        source=source,
    )
    return SystemProfile(
        name=name,
        description=description,
        grants=lexical.grants,
        policy=policy,
        proc_self=proc_self,
        exec=tuple(exec_paths),
        command_prefix=command_prefix,
        source=source,
    )
