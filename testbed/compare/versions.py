"""The same matrix on several QEMU versions: results side by side and what differs.

A scenario's results on two versions differ in what is opened when the
normalised traces of an oracle registered ``across_versions`` differ
(patched QEMU's broker audit and stock QEMU's strace), and in an oracle
judged by outcome (fd sets) when one version's works and the other's fails
(or fails differently).  The report shows each difference, scenario by
scenario, against the first version run.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from testbed.compare.compare import Status
from testbed.compare.oracles import Oracle, across_versions, by_outcome
from testbed.compare.run import ScenarioResult
from testbed.compare.trace import lines

#: The oracles whose traces are compared across versions (the model is one
#: model for every version; fd sets have no trace).
TRACED = across_versions()


def versions_of(results: list[ScenarioResult]) -> list[str]:
    """The versions in ``results``, in the order they were run."""
    return list(dict.fromkeys(r.qemu_version for r in results))


def by_version(results: list[ScenarioResult]) -> dict[str, list[ScenarioResult]]:
    out: dict[str, list[ScenarioResult]] = {}
    for r in results:
        out.setdefault(r.qemu_version, []).append(r)
    return out


def rows(results: list[ScenarioResult]) -> list[tuple[str, dict[str, ScenarioResult]]]:
    """(scenario name, {version: result}) in the matrix's order."""
    out: dict[str, dict[str, ScenarioResult]] = {}
    for r in results:
        out.setdefault(r.scenario.name, {})[r.qemu_version] = r
    return list(out.items())


def outcome_text(r: ScenarioResult, oracle: Oracle) -> str:
    """``works``, ``fails: <error>`` or ``skipped``: an oracle judged by outcome, in ``r``."""
    fd = r.oracles.get(oracle.name)
    if fd is None or fd.skipped:
        return "skipped"
    return "works" if fd.ok else f"fails: {fd.first_error}"


@dataclass(frozen=True, kw_only=True)
class Difference:
    """What one scenario does differently on ``version`` than on ``base``."""

    scenario: str
    base: str
    version: str
    #: oracle -> unified diff of its normalised opens (base first)
    opens: dict[str, tuple[str, ...]]
    #: oracle judged by outcome -> (base's result, version's), for those that differ
    outcomes: dict[str, tuple[str, str]]
    #: (base's status, version's), when they differ
    status: tuple[Status, Status] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "base": self.base,
            "version": self.version,
            "opens": {k: list(v) for k, v in self.opens.items()},
            **{
                o.name: list(self.outcomes[o.name]) if o.name in self.outcomes else None
                for o in by_outcome()
            },
            "status": list(self.status) if self.status else None,
        }


def _opens(a: ScenarioResult, b: ScenarioResult, oracle: str) -> tuple[str, ...]:
    x, y = a.oracles.get(oracle), b.oracles.get(oracle)
    if x is None or y is None or x.skipped or y.skipped:
        return ()
    return tuple(
        difflib.unified_diff(
            lines(x.trace),
            lines(y.trace),
            f"{oracle} {a.qemu_version}",
            f"{oracle} {b.qemu_version}",
            lineterm="",
        )
    )


def differences(results: list[ScenarioResult]) -> list[Difference]:
    """Every scenario whose opens, outcomes (fd sets) or status differ from the first version's."""
    versions = versions_of(results)
    out = []
    for name, per in rows(results):
        base = per.get(versions[0]) if versions else None
        if base is None:
            continue
        for v in versions[1:]:
            other = per.get(v)
            if other is None:
                continue
            opens = {o: d for o in TRACED if (d := _opens(base, other, o))}
            texts = {o.name: (outcome_text(base, o), outcome_text(other, o)) for o in by_outcome()}
            outcomes = {name: (a, b) for name, (a, b) in texts.items() if a != b}
            sa, sb = base.status, other.status
            if opens or outcomes or sa != sb:
                out.append(
                    Difference(
                        scenario=name,
                        base=base.qemu_version,
                        version=v,
                        opens=opens,
                        outcomes=outcomes,
                        status=(sa, sb) if sa != sb else None,
                    )
                )
    return out


def compared(results: list[ScenarioResult]) -> int:
    """How many scenarios ran on more than one version."""
    return sum(1 for _, per in rows(results) if len(per) > 1)
