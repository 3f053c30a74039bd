"""Known divergences: output lines a hooked QEMU differs in, on purpose, with the reason.

A hooked-only failure is *explained* when every line its diff removes and
every line it adds matches one of the test's known divergences (a removed
and an added pattern, both regular expressions over the whole line without
its ``-``/``+``).  Anything else in the same diff leaves the failure
unexplained, so a divergence cannot hide a defect next to it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownDivergence:
    test: str
    removed: str  # regex a removed (expected) line matches
    added: str  # regex an added (hooked) line matches
    reason: str

    def __post_init__(self) -> None:
        re.compile(self.removed)
        re.compile(self.added)


KNOWN: tuple[KnownDivergence, ...] = (
    KnownDivergence(
        test="051",
        removed=r"QEMU_PROG: -drive driver=null-co,snapshot=on: Could not open temporary file "
        r"SNAPSHOT_PATH: No such file or directory",
        added=r"QEMU_PROG: -drive driver=null-co,snapshot=on: Could not open temporary file "
        r"SNAPSHOT_PATH: Permission denied",
        reason="TMPDIR=/nonexistent: the -snapshot overlay is created through the hook "
        "(patch 0006) or the supervisor; /nonexistent is under no grant, and the broker "
        "(and the supervisor, the same policy engine) answers every "
        "refusal with EACCES whether or not the path exists, so that a confined QEMU "
        "learns nothing about files outside its grants. QEMU alone gets ENOENT.",
    ),
)


def _changed(diff: Sequence[str]) -> tuple[list[str], list[str]]:
    removed, added = [], []
    for line in diff:
        if line.startswith(("---", "+++")):
            continue
        if line.startswith("-"):
            removed.append(line[1:].rstrip())
        elif line.startswith("+"):
            added.append(line[1:].rstrip())
    return removed, added


def explain(
    test: str, diff: Sequence[str], known: Sequence[KnownDivergence] = KNOWN
) -> list[KnownDivergence] | None:
    """The known divergences that account for every changed line, or None."""
    mine = [k for k in known if k.test == test]
    removed, added = _changed(diff)
    if not mine or not (removed or added):
        return None
    used: list[KnownDivergence] = []
    for lines, pick in ((removed, "removed"), (added, "added")):
        for line in lines:
            k = next((k for k in mine if re.fullmatch(getattr(k, pick), line)), None)
            if k is None:
                return None
            if k not in used:
                used.append(k)
    return used


__all__ = ["KNOWN", "KnownDivergence", "explain"]
