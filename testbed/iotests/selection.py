"""Which of the suite's tests start qemu-system, and with which image format.

The hook only changes what qemu-system does, so only tests that start it
can tell hooked from unhooked.  A test starts it when, for bash tests, it
calls ``_launch_qemu`` (common.qemu) or ``$QEMU``/``_qemu`` (common.rc's
wrapper around ``$QEMU_PROG``), and for Python tests when it builds an
``iotests.VM`` (or a ``QEMUMachine``).  ``qemu_pipe`` alone does not count:
every Python test runs it once to ask for ``-drive format=help``.

A test runs once, with the first format of the caller's list it supports
(``_supported_fmt`` / ``supported_fmts=[...]``; ``generic`` covers every
format but bochs, cloop, dmg and vvfat, as in ``common.rc``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from testbed.errors import IotestsError


class Language(StrEnum):
    BASH = "bash"
    PYTHON = "python"


#: Formats ``generic`` does not include (common.rc, testenv.py).
NOT_GENERIC = frozenset({"bochs", "cloop", "dmg", "vvfat"})

#: The formats tried by default, in order of preference.
DEFAULT_FORMATS = ("qcow2", "raw", "vvfat", "vmdk", "vpc", "vdi", "vhdx")

_BASH_STARTS_QEMU = re.compile(r"_launch_qemu\b|\$\{?QEMU\}?(?![_A-Za-z0-9])|(?<![\w-])_qemu\b")
_PY_STARTS_QEMU = re.compile(r"\biotests\.VM\(|(?<![\w.])VM\(|\bQEMUMachine\(")
_BASH_FORMATS = re.compile(r"^\s*_supported_fmt\s+(.+)$", re.M)
_PY_FORMATS = re.compile(r"supported_fmts\s*=\s*\[([^\]]*)\]", re.S)
_GROUPS = re.compile(r"^# group:(.*)$", re.M)


@dataclass(frozen=True)
class SuiteTest:
    """One test of tests/qemu-iotests, as its source declares it."""

    name: str  # what check takes: "051", or "mirror-top-perms" for tests/mirror-top-perms
    path: Path
    language: Language
    groups: frozenset[str]
    formats: tuple[str, ...]  # declared; () means the test does not restrict formats
    starts_qemu: bool

    def supports(self, fmt: str) -> bool:
        if not self.formats:
            return True
        return fmt in self.formats or ("generic" in self.formats and fmt not in NOT_GENERIC)

    def format_for(self, preferred: Sequence[str]) -> str | None:
        return next((f for f in preferred if self.supports(f)), None)


def read_test(path: Path, name: str) -> SuiteTest:
    text = path.read_text(errors="replace")
    first = text.split("\n", 1)[0]
    language = Language.PYTHON if "python" in first else Language.BASH
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    if language is Language.PYTHON:
        starts = bool(_PY_STARTS_QEMU.search(code))
        fm = _PY_FORMATS.search(code)
        formats = tuple(re.findall(r"['\"]([\w-]+)['\"]", fm.group(1))) if fm else ()
    else:
        starts = bool(_BASH_STARTS_QEMU.search(code))
        formats = tuple(w for m in _BASH_FORMATS.finditer(code) for w in m.group(1).split())
    gm = _GROUPS.search(text)
    groups = frozenset(gm.group(1).split()) if gm else frozenset()
    return SuiteTest(name, path, language, groups, formats, starts)


def scan_suite(iotests_dir: Path) -> list[SuiteTest]:
    """Every test file of a tests/qemu-iotests directory, in check's order."""
    if not (iotests_dir / "check").is_file():
        raise IotestsError(f"{iotests_dir}: no check script (not a tests/qemu-iotests directory)")
    found: list[SuiteTest] = []
    for p in sorted(iotests_dir.glob("[0-9][0-9][0-9]")):
        found.append(read_test(p, p.name))
    named = iotests_dir / "tests"
    if named.is_dir():
        for p in sorted(named.iterdir()):
            if p.is_file() and "." not in p.name:
                found.append(read_test(p, p.name))
    return found


@dataclass(frozen=True)
class Planned:
    """One test run the harness will do: a test and the format it runs with."""

    test: SuiteTest
    format: str


@dataclass(frozen=True)
class LeftOut:
    name: str
    reason: str


def plan(
    tests: Iterable[SuiteTest],
    *,
    formats: Sequence[str] = DEFAULT_FORMATS,
    names: Sequence[str] = (),
    excluded: dict[str, str] | None = None,
) -> tuple[list[Planned], list[LeftOut]]:
    """The runs for ``names`` (or the default selection), and what was left out and why.

    Named tests run even when they do not start qemu-system or are in
    ``excluded``: asking for a test by name is a decision.
    """
    by_name = {t.name: t for t in tests}
    excluded = excluded or {}
    runs: list[Planned] = []
    left: list[LeftOut] = []
    if names:
        unknown = [n for n in names if _canonical(n) not in by_name]
        if unknown:
            raise IotestsError(f"no such iotest: {', '.join(unknown)}")
        chosen = [by_name[_canonical(n)] for n in names]
    else:
        chosen = []
        for t in by_name.values():
            if "disabled" in t.groups:
                left.append(LeftOut(t.name, "in the suite's 'disabled' group"))
            elif not t.starts_qemu:
                continue  # not part of what the hook can change; not listed one by one
            elif t.name in excluded:
                left.append(LeftOut(t.name, excluded[t.name]))
            else:
                chosen.append(t)
    for t in chosen:
        fmt = t.format_for(formats)
        if fmt is None:
            left.append(
                LeftOut(
                    t.name,
                    f"supports only {', '.join(t.formats)} "
                    f"(asked, and in the build: {', '.join(formats)})",
                )
            )
        else:
            runs.append(Planned(t, fmt))
    return runs, left


def _canonical(name: str) -> str:
    return f"{int(name):03}" if name.isdigit() else name


__all__ = [
    "DEFAULT_FORMATS",
    "Language",
    "LeftOut",
    "Planned",
    "SuiteTest",
    "plan",
    "read_test",
    "scan_suite",
]
