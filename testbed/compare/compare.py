"""Comparing two normalised traces, with a small table of known divergences.

Two traces match when they are equal, open for open, in order.  A
difference is a mismatch unless one of :data:`KNOWN_DIVERGENCES` explains
it: each entry applies to one pair of sources and to scenarios carrying
its tag, and rewrites both traces in a stated, narrow way (drop the opens
one side cannot see, stop at the first refused open).  If the rewritten
traces are equal the pair is a ``known-divergence`` naming the entries that
changed something; otherwise it is a ``mismatch`` with a diff of the
original traces.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from testbed.compare.normalise import CWD_PREFIX
from testbed.compare.trace import Open, lines


class Status(enum.StrEnum):
    """A pair's (and a scenario's) verdict, declared worst first.

    The declaration order is the severity order: a scenario's status is the
    worst of its pairs' (:meth:`worst`), ``skipped`` only when every pair was.
    """

    MISMATCH = "mismatch"
    KNOWN = "known-divergence"
    MATCH = "match"
    SKIPPED = "skipped"

    @property
    def severity(self) -> int:
        """0 for the worst status, growing as it gets better."""
        return list(Status).index(self)

    @classmethod
    def worst(cls, statuses: Iterable[Status]) -> Status:
        """The worst of ``statuses``; ``skipped`` when there are none."""
        return min((Status(s) for s in statuses), key=lambda s: s.severity, default=cls.SKIPPED)


#: Worst first: a scenario's status is the worst of its pairs'.
SEVERITY: tuple[Status, ...] = tuple(Status)

Rewrite = Callable[[list[Open], list[Open]], tuple[list[Open], list[Open]]]


@dataclass(frozen=True, kw_only=True)
class KnownDivergence:
    key: str
    #: The pair it applies to (left, right), one of ``oracles.PAIRS`` (checked there).
    pair: tuple[str, str]
    #: Scenarios it applies to carry this tag ("" for every scenario).
    tag: str
    reason: str
    rewrite: Rewrite = field(repr=False)


def _drop_right(pred: Callable[[Open], bool]) -> Rewrite:
    def rewrite(left: list[Open], right: list[Open]) -> tuple[list[Open], list[Open]]:
        return left, [o for o in right if not pred(o)]

    return rewrite


def _until_refusal(left: list[Open], right: list[Open]) -> tuple[list[Open], list[Open]]:
    """Both traces up to the first open the left side's broker refused (result not compared)."""
    for i, o in enumerate(left):
        if o.result == "EACCES":
            cut = [*left[:i], _any_result(o)]
            other = [*right[:i], *(_any_result(x) for x in right[i : i + 1])]
            return cut, other
    return left, right


def _any_result(o: Open) -> Open:
    return Open(path=o.path, flags=o.flags, mode=o.mode, result="ok", probe=o.probe)


def _relative_refused(left: list[Open], right: list[Open]) -> tuple[list[Open], list[Open]]:
    """Take the right side's result for a cwd-relative open the left side's broker refused."""
    out = list(left)
    for i, (a, b) in enumerate(zip(left, right, strict=False)):
        if (
            a.path.startswith(CWD_PREFIX)
            and a.result == "EACCES"
            and (a.path, a.flags, a.mode) == (b.path, b.flags, b.mode)
        ):
            out[i] = replace(a, result=b.result)
    return out, right


KNOWN_DIVERGENCES: tuple[KnownDivergence, ...] = (
    KnownDivergence(
        key="refusal",
        pair=("patched", "stock"),
        tag="refusal",
        reason=(
            "stock QEMU has no broker to refuse an open: the traces are the same up to the "
            "open the broker refused (EACCES) and differ afterwards, because patched QEMU "
            "gives up where stock QEMU carries on."
        ),
        rewrite=_until_refusal,
    ),
    KnownDivergence(
        key="relative-name",
        pair=("patched", "stock"),
        tag="",
        reason=(
            "QEMU sometimes opens a name relative to its working directory (the host_cdrom "
            "probe of a whole 'fat:...' name; a qcow2 external data file named in the header). "
            "The hook sends it joined to that directory, which is outside the scenario's "
            "grant, so the broker answers EACCES; stock QEMU gets the kernel's answer for "
            "its working directory (ENOENT). Same request, other errno."
        ),
        rewrite=_relative_refused,
    ),
    KnownDivergence(
        key="refusal",
        pair=("seccomp", "stock"),
        tag="refusal",
        reason=(
            "stock QEMU has nobody to refuse an open: the traces are the same up to the "
            "open the supervisor refused (EACCES) and differ afterwards."
        ),
        rewrite=_until_refusal,
    ),
    KnownDivergence(
        key="relative-name",
        pair=("seccomp", "stock"),
        tag="",
        reason=(
            "QEMU sometimes opens a name relative to its working directory (the host_cdrom "
            "probe of a whole 'fat:...' name; a qcow2 external data file named in the "
            "header). The supervisor resolves it against QEMU's cwd, which lies outside the "
            "grants, and refuses it (EACCES); stock QEMU gets the kernel's answer (ENOENT). "
            "Same request, other errno."
        ),
        rewrite=_relative_refused,
    ),
)


@dataclass(frozen=True, kw_only=True)
class PairResult:
    left: str
    right: str
    status: Status
    #: Keys of the known divergences that changed something.
    divergences: tuple[str, ...] = ()
    #: A unified diff of the two traces, when they differ at all.
    diff: tuple[str, ...] = ()
    why_skipped: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "left": self.left,
            "right": self.right,
            "status": self.status,
            "divergences": list(self.divergences),
            "diff": list(self.diff),
            "why_skipped": self.why_skipped,
        }


def unified(left_name: str, left: list[Open], right_name: str, right: list[Open]) -> list[str]:
    return list(
        difflib.unified_diff(lines(left), lines(right), left_name, right_name, lineterm="", n=2)
    )


def compare_pair(
    left_name: str,
    left: list[Open],
    right_name: str,
    right: list[Open],
    *,
    tags: frozenset[str] = frozenset(),
    table: tuple[KnownDivergence, ...] = KNOWN_DIVERGENCES,
) -> PairResult:
    """Compare ``left`` with ``right`` under the entries of ``table`` that apply."""
    if left == right:
        return PairResult(left=left_name, right=right_name, status=Status.MATCH)
    diff = tuple(unified(left_name, left, right_name, right))
    a, b = left, right
    used = []
    for entry in table:
        if entry.pair != (left_name, right_name) or (entry.tag and entry.tag not in tags):
            continue
        a2, b2 = entry.rewrite(a, b)
        if (a2, b2) != (a, b):
            used.append(entry.key)
            a, b = a2, b2
    status = Status.KNOWN if used and a == b else Status.MISMATCH
    return PairResult(
        left=left_name, right=right_name, status=status, divergences=tuple(used), diff=diff
    )


def skipped(left_name: str, right_name: str, why: str) -> PairResult:
    return PairResult(left=left_name, right=right_name, status=Status.SKIPPED, why_skipped=why)


def overall(results: list[PairResult]) -> Status:
    """The worst status among ``results`` (``skipped`` only if all were skipped)."""
    return Status.worst(r.status for r in results)
