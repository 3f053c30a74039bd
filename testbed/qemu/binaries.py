"""Where the QEMU binaries are, by version and kind: :func:`qemu_binary` is the one way to ask.

``make qemu`` links every build at ``build/qemu/<version>/<kind>/`` of the
checkout (a symlink into the cache, ``bin/`` inside: ``qemu-system-x86_64``,
``qemu-img``, ``qemu-io``, ``qemu-nbd``, ``qemu-storage-daemon``, and
``open-hook-server`` in patched builds).  A version whose stock oracle is
Debian's own binary (7.2) has no stock build: its stock programs are
Debian's, in ``/usr/bin``.

The helpers from before versions existed (:data:`STOCK_QEMU`,
:func:`patched_qemu_path`, :func:`open_hook_server_path`, :func:`build_dir`,
:func:`cache_key`) are thin wrappers meaning the default version (7.2).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import BuildError, MissingBuildError, UnknownProgramError
from testbed.qemu.versions import (
    DEFAULT_VERSION,
    OPEN_HOOK_SERVER,
    SYSTEM_EMULATOR,
    TOOLS,
    VERSIONS,
    Kind,
    QemuVersion,
    get,
    kind_of,
)

#: The checkout this package lives in (``build/`` and ``scripts/`` are there).
REPO_ROOT = Path(__file__).resolve().parents[2]

#: Programs a (version, kind) can be asked for.
PROGRAMS = (SYSTEM_EMULATOR, *TOOLS, OPEN_HOOK_SERVER)


def build_root(repo: Path | None = None) -> Path:
    """``build/qemu`` of the checkout: one directory per version, one link per kind."""
    return (repo or REPO_ROOT) / "build" / "qemu"


def qemu_binary(
    version: str | None = None,
    kind: Kind | str = Kind.PATCHED,
    *,
    program: str | None = None,
    repo: Path | None = None,
    must_exist: bool = False,
) -> Path:
    """The path of a QEMU binary: ``version`` ("7.2", "10.0"; None = 7.2) of ``kind``.

    ``kind`` is ``patched`` (the series), ``stock`` (Debian's binary for 7.2,
    the same source built without the series for 10.0) or
    ``open-hook-server`` (the series' C example broker, built with the
    patched QEMU).  ``program`` picks another program of the same build:
    ``qemu-img``, ``qemu-io``, ``qemu-nbd``, ``qemu-storage-daemon``
    (default: ``qemu-system-x86_64``, or ``open-hook-server`` for that kind).

    The path may not exist yet; with ``must_exist`` a missing one raises
    :class:`~testbed.errors.MissingBuildError` naming the ``make`` command
    that builds it.  An unknown version, kind or program raises
    :class:`~testbed.errors.QemuVersionError` (an unknown program its
    :class:`~testbed.errors.UnknownProgramError`, also a ``ValueError``).
    """
    v = get(version or DEFAULT_VERSION)
    k = kind_of(kind)
    prog = program or (OPEN_HOOK_SERVER if k is Kind.OPEN_HOOK_SERVER else SYSTEM_EMULATOR)
    if prog not in PROGRAMS:
        raise UnknownProgramError(
            f"unknown QEMU program {prog!r} (known: {', '.join(PROGRAMS)})", program=prog
        )
    if (k is Kind.OPEN_HOOK_SERVER) != (prog == OPEN_HOOK_SERVER):
        raise UnknownProgramError(f"{prog} is not a program of kind {k.value}", program=prog)
    if k is Kind.STOCK and v.system_stock is not None:
        path = v.system_stock.parent / prog
    else:
        built = Kind.PATCHED if k is Kind.OPEN_HOOK_SERVER else k
        path = build_root(repo) / v.name / built.value / "bin" / prog
    if must_exist and not is_runnable(path):
        raise MissingBuildError(
            f"QEMU {v.name} {k.value} {prog} is missing: {path} ({build_hint(v, k)})",
            version=v.name,
            kind=k.value,
            path=str(path),
        )
    return path


def build_hint(version: QemuVersion, kind: Kind) -> str:
    """What makes the (version, kind) binaries exist."""
    if kind is Kind.STOCK and version.system_stock is not None:
        return "Debian's package: scripts/deps.sh installs it"
    return f"run `make qemu QEMU_VERSIONS={version.name}`"


def is_runnable(path: Path | str) -> bool:
    """Whether ``path`` is a file we may execute; a bare name is looked up on ``PATH``.

    The package's one check of a binary (builds, fixtures, the machine's
    launch, the iotests builds), so "is it there" means the same everywhere:
    what ``exec`` would run.
    """
    return shutil.which(str(path)) is not None


@dataclass(frozen=True, kw_only=True)
class BinaryInfo:
    """One (version, kind) of ``testbed qemu info``: its main program, tools, and version."""

    version: str
    kind: str
    #: ``qemu-system-x86_64``, or ``open-hook-server`` for that kind.
    path: Path
    #: The other programs of the same build (none for ``open-hook-server``).
    tools: dict[str, Path]
    #: The programs of this (version, kind) that are not there.
    missing: tuple[str, ...]
    #: The first line of ``--version`` ("" for open-hook-server or a missing binary).
    version_string: str
    #: The cache entry's ``info.json`` (key, source version, build seconds), if any.
    build: dict[str, object]

    @property
    def present(self) -> bool:
        return not self.missing

    def to_json(self) -> dict[str, object]:
        return {
            "version": self.version,
            "kind": self.kind,
            "path": str(self.path),
            "resolved": str(self.path.resolve()) if is_runnable(self.path) else "",
            "present": self.present,
            "missing": list(self.missing),
            "version_string": self.version_string,
            "tools": {name: str(p) for name, p in self.tools.items()},
            "key": self.build.get("key", ""),
            "source_version": self.build.get("source_version", ""),
            "build_seconds": self.build.get("seconds"),
        }


def version_string(binary: Path) -> str:
    """The first line ``binary --version`` prints, or why there is none."""
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return f"cannot run: {err}"
    return out.splitlines()[0] if out else "no version output"


def describe(version: str, kind: Kind | str, *, repo: Path | None = None) -> BinaryInfo:
    """A :class:`BinaryInfo` for one (version, kind), running ``--version`` if it is there."""
    k = kind_of(kind)
    path = qemu_binary(version, k, repo=repo)
    tools = (
        {}
        if k is Kind.OPEN_HOOK_SERVER
        else {t: qemu_binary(version, k, program=t, repo=repo) for t in TOOLS}
    )
    missing = tuple(p.name for p in (path, *tools.values()) if not is_runnable(p))
    build: dict[str, object] = {}
    info = path.parent.parent / "info.json"
    if info.is_file():
        try:
            build = json.loads(info.read_text())
        except (OSError, json.JSONDecodeError):
            build = {}
    runs = is_runnable(path) and k is not Kind.OPEN_HOOK_SERVER
    return BinaryInfo(
        version=get(version).name,
        kind=k.value,
        path=path,
        tools=tools,
        missing=missing,
        version_string=version_string(path) if runs else "",
        build=build,
    )


def built_versions(repo: Path | None = None) -> tuple[str, ...]:
    """The registered versions whose patched ``qemu-system-x86_64`` is built."""
    return tuple(v for v in VERSIONS if is_runnable(qemu_binary(v, Kind.PATCHED, repo=repo)))


def cache_keys(repo: Path | None = None) -> dict[tuple[str, str], str]:
    """``{(version, kind): key}`` that ``scripts/build-qemu.sh`` would build the inputs under."""
    script = (repo or REPO_ROOT) / "scripts" / "build-qemu.sh"
    try:
        done = subprocess.run(
            [str(script), "--print-key", *VERSIONS],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"cannot compute the QEMU cache keys with {script}: {err}") from err
    keys = {}
    for line in done.stdout.splitlines():
        version, kind, key = line.split()
        keys[(version, kind)] = key
    return keys


# -- the helpers from before versions existed: the default version ------------------

#: Debian's QEMU, the stock binary of the default version (7.2).
STOCK_QEMU = qemu_binary(DEFAULT_VERSION, Kind.STOCK)


def build_dir(repo: Path | None = None) -> Path:
    """The default version's patched build (``build/qemu/7.2/patched``)."""
    return build_root(repo) / DEFAULT_VERSION / Kind.PATCHED.value


def patched_qemu_path(repo: Path | None = None) -> Path:
    """The default version's patched ``qemu-system-x86_64`` (= ``qemu_binary()``)."""
    return qemu_binary(DEFAULT_VERSION, Kind.PATCHED, repo=repo)


def open_hook_server_path(repo: Path | None = None) -> Path:
    """The series' C example broker of the default version."""
    return qemu_binary(DEFAULT_VERSION, Kind.OPEN_HOOK_SERVER, repo=repo)


def cache_key(repo: Path | None = None) -> str:
    """The key of the default version's patched build."""
    return cache_keys(repo)[(DEFAULT_VERSION, Kind.PATCHED.value)]
