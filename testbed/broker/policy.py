"""The broker's access policy: which paths a peer may open, and how.

A policy is a list of grants.  A grant names a file or a directory (a
directory grants everything beneath it) and an access level:

``ro``      open for reading only
``rw``      also open for writing (``O_WRONLY``/``O_RDWR``, ``O_TRUNC``, ``O_APPEND``)
``create``  also create files (``O_CREAT``); implies ``rw``, since QEMU
            writes every file it creates

Grants are additive: a request is allowed when the longest grant covering
its path that is strong enough allows it.  Options per grant, each of which
relaxes one of the broker's guarantees (docs/broker.md says what each one
gives the peer):

``symlinks``      follow symlinks whose every hop stays beneath a grant
``devices``       allow device nodes, FIFOs and sockets
``hardlinks``     allow regular files with more than one link (the other
                  link may be outside the grant)
``directories``   hand out directory fds (a peer can ``openat(fd, "..")``)
``cross_mounts``  follow paths across mount points inside the grant

TOML form (``--policy FILE``)::

    refuse_errno = "EACCES"     # errno for refusals (name or number)
    peer_uid = 107              # optional: only this peer uid
    peer_pid = 4242             # optional: only this peer pid
    create_mode_mask = 0o775    # optional: mode bits a create may keep

    [[grant]]
    path = "/srv/images"
    access = "create"
    symlinks = false
    devices = false
    hardlinks = false
    directories = false
    cross_mounts = false
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import IntEnum
from functools import cached_property
from typing import TYPE_CHECKING, Any

from testbed.errors import PolicyError
from testbed.protocol.flags import wants_create, wants_write

if TYPE_CHECKING:
    from pathlib import Path


class Access(IntEnum):
    """Access levels, ordered: each includes the ones below it."""

    RO = 1
    RW = 2
    CREATE = 3

    @classmethod
    def parse(cls, text: str, *, source: str = "") -> Access:
        try:
            return {"ro": cls.RO, "rw": cls.RW, "create": cls.CREATE}[text.lower()]
        except KeyError:
            raise PolicyError(
                f"access {text!r} is not one of ro, rw, create", source=source
            ) from None

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, kw_only=True)
class Grant:
    """One rule of the policy."""

    path: str
    access: Access
    symlinks: bool = False
    devices: bool = False
    hardlinks: bool = False
    directories: bool = False
    cross_mounts: bool = False
    #: ``path`` with one trailing slash: what a path beneath the grant starts with.
    _prefix: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not os.path.isabs(self.path):
            raise PolicyError(f"grant path {self.path!r} is not absolute")
        normal = os.path.normpath(self.path)
        if normal.startswith("//"):
            normal = "/" + normal.lstrip("/")
        object.__setattr__(self, "path", normal)
        object.__setattr__(self, "_prefix", normal if normal.endswith("/") else normal + "/")

    def covers(self, path: str) -> str | None:
        """The part of ``path`` beneath this grant ("" for the grant itself), or None."""
        if path == self.path:
            return ""
        if path.startswith(self._prefix):
            return path[len(self._prefix) :].lstrip("/")
        return None


#: The per-grant switches, in the order ``describe`` prints them.
GRANT_OPTIONS = ("symlinks", "devices", "hardlinks", "directories", "cross_mounts")

DEFAULT_CREATE_MASK = 0o775  # no setuid/setgid/sticky, not world-writable


@dataclass(frozen=True, kw_only=True)
class Policy:
    """Grants plus connection-level rules."""

    grants: tuple[Grant, ...] = ()
    refuse_errno: int = errno.EACCES
    peer_uid: int | None = None
    peer_pid: int | None = None
    create_mode_mask: int = DEFAULT_CREATE_MASK
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.refuse_errno < 4096:
            raise PolicyError(f"refuse_errno {self.refuse_errno} is not an errno")
        if self.create_mode_mask & ~0o7777:
            raise PolicyError(f"create_mode_mask {self.create_mode_mask:#o} has non-mode bits")

    @classmethod
    def from_grants(
        cls,
        *,
        ro: Iterable[str | Path] = (),
        rw: Iterable[str | Path] = (),
        create: Iterable[str | Path] = (),
        symlinks: bool = False,
        directories: bool = False,
        devices: bool = False,
        **kwargs: Any,
    ) -> Policy:
        """A policy from lists of paths per access level (the command-line flags)."""
        grants = [
            Grant(
                path=str(p),
                access=level,
                symlinks=symlinks,
                directories=directories,
                devices=devices,
            )
            for level, paths in ((Access.RO, ro), (Access.RW, rw), (Access.CREATE, create))
            for p in paths
        ]
        return cls(grants=tuple(grants), **kwargs)

    @classmethod
    def from_toml(cls, path: str | Path) -> Policy:
        import tomllib  # here, not at the top: a hooked QEMU waits for the broker's start-up

        source = str(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as err:
            raise PolicyError(f"cannot read policy: {err.strerror}", source=source) from err
        except tomllib.TOMLDecodeError as err:
            raise PolicyError(f"not valid TOML: {err}", source=source) from err
        return cls.from_mapping(data, source=source)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], *, source: str = "") -> Policy:
        known = {"grant", "refuse_errno", "peer_uid", "peer_pid", "create_mode_mask"}
        unknown = set(data) - known
        if unknown:
            raise PolicyError(f"unknown keys {sorted(unknown)}", source=source)
        grants = []
        raw_grants = data.get("grant", [])
        if not isinstance(raw_grants, list):
            raise PolicyError("'grant' must be an array of tables ([[grant]])", source=source)
        for i, item in enumerate(raw_grants):
            where = f"{source}: grant #{i + 1}" if source else f"grant #{i + 1}"
            if not isinstance(item, dict) or "path" not in item or "access" not in item:
                raise PolicyError("needs 'path' and 'access'", source=where)
            extra = set(item) - {"path", "access", *GRANT_OPTIONS}
            if extra:
                raise PolicyError(f"unknown keys {sorted(extra)}", source=where)
            for flag in GRANT_OPTIONS:
                if not isinstance(item.get(flag, False), bool):
                    raise PolicyError(f"{flag!r} must be true or false", source=where)
            if not isinstance(item["path"], str):
                raise PolicyError("'path' must be a string", source=where)
            try:
                grant = Grant(
                    path=item["path"],
                    access=Access.parse(str(item["access"]), source=where),
                    **{flag: item.get(flag, False) for flag in GRANT_OPTIONS},
                )
            except PolicyError as err:
                if err.source:
                    raise
                raise PolicyError(str(err), source=where) from err
            grants.append(grant)
        kwargs: dict[str, Any] = {"grants": tuple(grants), "source": source}
        if "refuse_errno" in data:
            kwargs["refuse_errno"] = parse_errno(data["refuse_errno"], source=source)
        for key in ("peer_uid", "peer_pid", "create_mode_mask"):
            if key in data:
                if not isinstance(data[key], int) or isinstance(data[key], bool):
                    raise PolicyError(f"{key!r} must be an integer", source=source)
                kwargs[key] = data[key]
        return cls(**kwargs)

    def merged(self, other: Policy) -> Policy:
        """This policy with ``other``'s grants added and its settings taking precedence."""
        return replace(other, grants=self.grants + other.grants)

    @cached_property
    def by_length(self) -> tuple[Grant, ...]:
        """The grants, longest path first: the most specific grant is tried first."""
        return tuple(sorted(self.grants, key=lambda g: len(g.path), reverse=True))

    def covering(self, path: str) -> list[tuple[Grant, str]]:
        """Grants covering ``path`` with the remainder beneath each, longest first."""
        return [(g, rest) for g in self.by_length if (rest := g.covers(path)) is not None]

    def describe(self) -> list[str]:
        lines = [
            f"{g.access.label:6} {g.path}"
            + "".join(f" +{o}" for o in GRANT_OPTIONS if getattr(g, o))
            for g in self.grants
        ]
        return lines or ["(no grants: every open is refused)"]


def parse_errno(value: object, *, source: str = "") -> int:
    """An errno from a name (``"EACCES"``) or a number."""
    if isinstance(value, int) and not isinstance(value, bool):
        code = value
    elif isinstance(value, str) and value.isdigit():
        code = int(value)
    elif isinstance(value, str) and hasattr(errno, value.upper()):
        code = int(getattr(errno, value.upper()))
    else:
        raise PolicyError(f"refuse_errno {value!r} is not an errno name or number", source=source)
    if not 0 < code < 4096:
        raise PolicyError(f"refuse_errno {code} is out of range", source=source)
    return code


def needed_access(flags: int) -> Access:
    """The access level an open with ``flags`` needs."""
    if wants_create(flags):
        return Access.CREATE
    if wants_write(flags):
        return Access.RW
    return Access.RO
