"""The oracles of a comparison, registered once: how each runs and how the report shows it.

An oracle is a runner module under :mod:`testbed.compare.runners`
(``run(setup) -> OracleResult``) plus one :class:`Oracle` entry in
:data:`ORACLES`.  The entry's attributes are everything the rest of the
comparison knows about it: ``testbed compare --oracles`` takes its name, the
JSON holds its result under that name, and the reports (terminal, Markdown,
HTML) build their columns, titles and details from the entries and from
:data:`PAIRS` -- no report code names an oracle.

Two kinds of verdict (:class:`Verdict`): an oracle whose opens are compared
with another's in a :class:`Pair` (the model, patched and stock QEMU,
seccomp), and one judged by whether every step worked (fd sets: they open
only ``/dev/fdset/N`` names, so their trace says nothing comparable).
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from testbed.compare.compare import KNOWN_DIVERGENCES, Status
from testbed.compare.runners import fdset, model, patched, seccomp, stock
from testbed.compare.runners.result import OracleResult
from testbed.compare.runners.setup import Setup
from testbed.errors import RegistryError

#: What runs an oracle: a scenario ready for it in, what it did out.
Runner = Callable[[Setup], OracleResult]


class Verdict(enum.StrEnum):
    """How the report judges an oracle's result."""

    #: Its opens are compared with another oracle's (in :data:`PAIRS`).
    TRACE = "trace"
    #: Whether every step worked: the report says ``works`` or ``fails``.
    WORKS = "works"


@dataclass(frozen=True, kw_only=True)
class OperationColumn:
    """A column an oracle adds to the per-operation summary, computed from its results."""

    #: Its key in the JSON's operation rows.
    key: str
    #: Its heading in the Markdown and HTML tables.
    heading: str
    #: The column's value for one operation's results: a list (joined with ``; ``) or a text.
    compute: Callable[[list[OracleResult]], list[str] | str]
    #: Its heading in the terminal table ("": not shown there).
    terminal: str = ""
    #: The longest terminal cell (0: no limit).
    width: int = 0
    #: Whether Markdown needs its ``|`` escaped (texts QEMU wrote; our own texts have none).
    escape: bool = False

    def text(self, value: list[str] | str) -> str:
        """The cell's text, ``-`` when empty."""
        return ("; ".join(value) if isinstance(value, list) else value) or "-"


@dataclass(frozen=True, kw_only=True)
class Oracle:
    """One oracle: its runner and what the report does with its result."""

    #: Its key in :data:`ORACLES`, in ``--oracles`` and in the JSON.
    name: str
    run: Runner
    #: What the report calls it in prose and headings ("patched QEMU", "fd sets").
    title: str
    verdict: Verdict = Verdict.TRACE
    #: The adjective in prose about its results ("the fd-set result"); default: the name.
    adjective: str = ""
    #: Named in the report's title, and each scenario's details list its operations.
    listed: bool = True
    #: Set for the oracle whose opens the scenario rows count and each scenario's
    #: details print (patched QEMU's broker audit): the heading they print under.
    trace_heading: str = ""
    #: Its opens are compared between QEMU versions (the model is one model for all).
    across_versions: bool = False
    #: The per-operation summary says in how many scenarios it worked.
    works_per_operation: bool = False
    #: Further per-operation columns made from its results.
    columns: tuple[OperationColumn, ...] = ()
    #: What the per-operation columns of a ``works`` oracle mean (the Markdown legend).
    legend: str = ""

    @property
    def judged_by_outcome(self) -> bool:
        return self.verdict is Verdict.WORKS

    @property
    def result_word(self) -> str:
        return self.adjective or self.name


@dataclass(frozen=True, kw_only=True)
class Pair:
    """Two oracles whose traces are compared; every pair decides a scenario's status."""

    left: str
    right: str
    #: Its column in the terminal's scenario rows ("": the reports show no column for it).
    column: str = ""
    #: The statuses under which it counts as the hook working (the per-operation
    #: ``hook`` column); empty: it does not count there.
    hook: frozenset[Status] = frozenset()

    @property
    def names(self) -> tuple[str, str]:
        return self.left, self.right

    @property
    def heading(self) -> str:
        """Its column heading in the Markdown and HTML reports: ``model = patched``."""
        return f"{self.left} = {self.right}"

    @property
    def key(self) -> str:
        """Its key in the JSON summary: ``model_vs_patched``."""
        return f"{self.left}_vs_{self.right}"


def short_error(text: str) -> str:
    """``op: <QEMU's last message>``: an fd-set failure without QEMU's option echo."""
    op, _, rest = text.partition(": ")
    if not rest:
        return text
    parts = rest.split(": ")
    last = parts[-1]
    # "Could not open 'X': Permission denied" needs its last two parts; an
    # echo of QEMU's option ("-drive if=none,...") or program name does not.
    if len(parts) >= 2 and len(last) < 40:
        before = parts[-2]
        if not before.startswith("-") and "=" not in before and " " in before:
            last = f"{before}: {last}"
    return f"{op}: {last}"


# -- the fd-set oracle's per-operation columns (what the testbed, as libvirt, had to do) --


def _reasons(entries: list[str]) -> list[str]:
    """The "(why)" parts of fd-set pre-open entries: what had to be O_RDWR and why."""
    out = []
    for e in entries:
        if "(" in e and "O_RDWR" in e:
            out += [w.strip() for w in e.split("(", 1)[1].split(")", 1)[0].split(";")]
    return out


def _counted(per_result: Iterable[list[str]], most: int | None = None) -> list[str]:
    """``thing (N)``: in how many results each thing appears, most frequent first."""
    counts: Counter[str] = Counter()
    for things in per_result:
        counts.update(dict.fromkeys(things, 1))
    return [f"{k} ({n})" for k, n in counts.most_common(most)]


def _preopened(results: list[OracleResult]) -> list[str]:
    return _counted(_reasons(f.extra.get("preopened", [])) for f in results)


def _created(results: list[OracleResult]) -> list[str]:
    return _counted([c.partition(" ")[2] or c for c in f.extra.get("created", [])] for f in results)


def _headers(results: list[OracleResult]) -> str:
    headers = [len(f.extra.get("headers", [])) for f in results]
    return f"{min(headers)}-{max(headers)} per scenario" if headers else "-"


def _errors(results: list[OracleResult]) -> list[str]:
    failed = [f for f in results if not f.ok and not f.skipped]
    counts = Counter(short_error(f.first_error)[:140] for f in failed)
    return [f"{k} ({n})" for k, n in counts.most_common(3)]


_FDSET_COLUMNS = (
    OperationColumn(
        key="preopened_rdwr",
        heading="pre-opened O_RDWR for",
        compute=_preopened,
        terminal="pre-opened O_RDWR for",
        width=120,
    ),
    OperationColumn(key="created", heading="created beforehand", compute=_created),
    OperationColumn(
        key="headers_parsed", heading="headers parsed", compute=_headers, terminal="headers"
    ),
    OperationColumn(key="fdset_errors", heading="fd-set errors", compute=_errors, escape=True),
)


# -- the registry ------------------------------------------------------------------------

#: Every oracle, by name, in the order they run (and the JSON and reports list them).
ORACLES: dict[str, Oracle] = {
    o.name: o
    for o in (
        Oracle(name="model", run=model.run, title="model"),
        Oracle(
            name="patched",
            run=patched.run,
            title="patched QEMU",
            trace_heading="Patched QEMU's opens (broker audit, normalised):",
            across_versions=True,
        ),
        Oracle(name="stock", run=stock.run, title="stock QEMU", across_versions=True),
        Oracle(
            name="fdset",
            run=fdset.run,
            title="fd sets",
            verdict=Verdict.WORKS,
            adjective="fd-set",
            columns=_FDSET_COLUMNS,
            legend=(
                "fd sets: scenarios where every step worked with only `/dev/fdset/N` names; "
                "what the fd-set side (the testbed as libvirt) had to pre-open read-write, "
                "create, and how many image headers it parsed per scenario"
            ),
        ),
        Oracle(
            name="seccomp", run=seccomp.run, title="seccomp", listed=False, works_per_operation=True
        ),
    )
}

_MATCHES = frozenset({Status.MATCH})
#: The comparisons that decide a scenario's status (left, right).
PAIRS: tuple[Pair, ...] = (
    Pair(left="model", right="patched", column="model=QEMU", hook=_MATCHES),
    Pair(
        left="patched",
        right="stock",
        column="QEMU=stock",
        hook=frozenset({Status.MATCH, Status.KNOWN}),
    ),
    Pair(left="seccomp", right="stock"),
    Pair(left="patched", right="seccomp"),
)
#: What the per-operation ``hook`` column counts (the Markdown legend).
HOOK_LEGEND = (
    "hook: scenarios where model = patched QEMU and patched = stock QEMU (or a known divergence)"
)


def listed() -> list[Oracle]:
    """The oracles the report names in its title and details."""
    return [o for o in ORACLES.values() if o.listed]


def by_outcome() -> list[Oracle]:
    """The oracles judged by whether every step worked (works / fails columns)."""
    return [o for o in ORACLES.values() if o.judged_by_outcome]


def counted_per_operation() -> list[Oracle]:
    """The oracles with an "N/M work" column in the per-operation summary."""
    return [o for o in ORACLES.values() if o.works_per_operation]


def operation_columns() -> list[tuple[Oracle, OperationColumn]]:
    """Every oracle's further per-operation columns, in registry order."""
    return [(o, c) for o in ORACLES.values() for c in o.columns]


def shown_pairs() -> list[Pair]:
    """The pairs with a column in the scenario rows."""
    return [p for p in PAIRS if p.column]


def reference() -> Oracle:
    """The oracle whose opens the scenario rows count and the details print."""
    return next(o for o in ORACLES.values() if o.trace_heading)


def across_versions() -> tuple[str, ...]:
    """The oracles whose opens are compared between QEMU versions."""
    return tuple(o.name for o in ORACLES.values() if o.across_versions)


def _check() -> None:
    """The registry is consistent: every pair and known divergence names registered oracles."""
    names = {o.name for o in ORACLES.values()}
    for pair in PAIRS:
        if not set(pair.names) <= names:
            raise RegistryError(f"pair {pair.names} names an oracle not in ORACLES")
    pairs = {p.names for p in PAIRS}
    for k in KNOWN_DIVERGENCES:
        if k.pair not in pairs:
            raise RegistryError(f"known divergence {k.key!r} is for {k.pair}, not one of PAIRS")
    if sum(1 for o in ORACLES.values() if o.trace_heading) != 1:
        raise RegistryError("exactly one oracle must have a trace_heading (the report's opens)")


_check()


__all__ = [
    "ORACLES",
    "PAIRS",
    "OperationColumn",
    "Oracle",
    "Pair",
    "Runner",
    "Verdict",
    "short_error",
]
