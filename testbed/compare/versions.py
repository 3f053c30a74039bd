"""The same matrix on several QEMU versions: results side by side and what differs.

A scenario's results on two versions differ in what is opened when the
normalised traces of an oracle differ (patched QEMU's broker audit and stock
QEMU's strace), and in fd sets when one version's works and the other's
fails (or fails differently).  The report shows each difference, scenario by
scenario, against the first version run.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from testbed.compare.run import ScenarioResult
from testbed.compare.trace import lines

#: The oracles whose traces are compared across versions (the model is one
#: model for every version; fd sets have no trace).
TRACED = ("patched", "stock")


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


def fdset_text(r: ScenarioResult) -> str:
    """``works``, ``fails: <error>`` or ``skipped``."""
    fd = r.oracles.get("fdset")
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
    #: (base's fd-set result, version's), when they differ
    fdset: tuple[str, str] | None
    #: (base's status, version's), when they differ
    status: tuple[str, str] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "base": self.base,
            "version": self.version,
            "opens": {k: list(v) for k, v in self.opens.items()},
            "fdset": list(self.fdset) if self.fdset else None,
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
    """Every scenario whose opens, fd-set result or status differ from the first version's."""
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
            fa, fb = fdset_text(base), fdset_text(other)
            sa, sb = base.status, other.status
            if opens or fa != fb or sa != sb:
                out.append(
                    Difference(
                        scenario=name,
                        base=base.qemu_version,
                        version=v,
                        opens=opens,
                        fdset=(fa, fb) if fa != fb else None,
                        status=(sa, sb) if sa != sb else None,
                    )
                )
    return out


def compared(results: list[ScenarioResult]) -> int:
    """How many scenarios ran on more than one version."""
    return sum(1 for _, per in rows(results) if len(per) > 1)
