"""Running a scenario through every oracle and comparing what they opened.

The oracles and the pairs compared are registered in
:mod:`testbed.compare.oracles`; this module only runs them.
"""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.compare.compare import PairResult, Status, compare_pair, overall, skipped
from testbed.compare.oracles import ORACLES, PAIRS, by_outcome
from testbed.compare.runners.images import ImageInfo
from testbed.compare.runners.result import OracleResult
from testbed.compare.runners.setup import Binaries, prepare
from testbed.compare.scenarios import Scenario, Tag
from testbed.errors import NoSuchPairError, TestbedError
from testbed.qemu import DEFAULT_VERSION

__all__ = ["ORACLES", "PAIRS", "ScenarioResult", "outcomes", "run_scenario"]


@dataclass(kw_only=True)
class ScenarioResult:
    scenario: Scenario
    image: ImageInfo | None
    oracles: dict[str, OracleResult] = field(default_factory=dict)
    pairs: list[PairResult] = field(default_factory=list)
    seconds: float = 0.0
    #: The QEMU version whose binaries ran it (the same scenario runs once per version).
    qemu_version: str = DEFAULT_VERSION

    @property
    def status(self) -> Status:
        return overall(self.pairs)

    def pair(self, left: str, right: str) -> PairResult:
        for p in self.pairs:
            if (p.left, p.right) == (left, right):
                return p
        raise NoSuchPairError(left, right, [(p.left, p.right) for p in self.pairs])

    def _outcomes_json(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The oracles judged by outcome: their result with ``ok`` and ``error`` added, and
        ``<name>_ok`` / ``<name>_error`` beside them (also when they did not run)."""
        results: dict[str, Any] = {}
        flags: dict[str, Any] = {}
        for oracle in by_outcome():
            res = self.oracles.get(oracle.name)
            if res is not None:
                results[oracle.name] = {**res.to_json(), "ok": res.ok, "error": res.first_error}
            flags[f"{oracle.name}_ok"] = bool(res and res.ok)
            flags[f"{oracle.name}_error"] = res.first_error if res else ""
        return results, flags

    def to_json(self) -> dict[str, Any]:
        sc = self.scenario
        outcomes, flags = self._outcomes_json()
        return {
            "name": sc.name,
            "qemu_version": self.qemu_version,
            "image": sc.image,
            "format": self.image.format if self.image else "",
            "subformat": self.image.subformat if self.image else None,
            "attach": sc.attach,
            "operation": sc.operation,
            "source": sc.source,
            "machine": sc.machine,
            "args": list(sc.args),
            "grant": str(sc.grant),
            "steps": [st.to_json() for st in sc.steps],
            "operations": list(sc.operations),
            "tags": sorted(sc.tags),
            **{name: res.to_json() for name, res in self.oracles.items()},
            **outcomes,
            **flags,
            "comparisons": [p.to_json() for p in self.pairs],
            "status": self.status,
            "seconds": round(self.seconds, 3),
        }


def outcomes(res: OracleResult) -> list[str]:
    """Which operations worked: ``read ok``, ``add failed`` (QEMU's wording differs)."""
    return [
        f"{op} {'ok' if text == 'ok' else 'failed'}"
        for op, text in res.operations
        if op != "launch" or text != "ok"
    ]


def _check_outcomes(
    pair: PairResult, a: OracleResult, b: OracleResult, scenario: Scenario
) -> PairResult:
    """Equal traces but an operation that worked on one side only is still a mismatch."""
    if pair.status == Status.MISMATCH or Tag.REFUSAL in scenario.tags:
        return pair
    oa, ob = outcomes(a), outcomes(b)
    if oa == ob:
        return pair
    diff = tuple(
        difflib.unified_diff(
            oa, ob, f"{pair.left} operations", f"{pair.right} operations", lineterm=""
        )
    )
    return PairResult(
        left=pair.left,
        right=pair.right,
        status=Status.MISMATCH,
        divergences=pair.divergences,
        diff=pair.diff + diff,
    )


def run_scenario(
    scenario: Scenario,
    image: ImageInfo | None,
    workdir: Path,
    oracles: tuple[str, ...] = tuple(ORACLES),
    *,
    binaries: Binaries,
) -> ScenarioResult:
    start = time.monotonic()
    out = ScenarioResult(scenario=scenario, image=image, qemu_version=binaries.version)
    for name in oracles:
        try:
            setup = prepare(scenario, image, workdir, name, binaries)
            out.oracles[name] = ORACLES[name].run(setup)
        except (TestbedError, OSError) as err:
            out.oracles[name] = OracleResult(skipped=f"{type(err).__name__}: {err}")
    for left, right in (p.names for p in PAIRS):
        a, b = out.oracles.get(left), out.oracles.get(right)
        if a is None or b is None:
            out.pairs.append(skipped(left, right, "not run"))
        elif a.skipped or b.skipped:
            out.pairs.append(skipped(left, right, a.skipped or b.skipped))
        else:
            pair = compare_pair(left, a.trace, right, b.trace, tags=scenario.tags)
            out.pairs.append(_check_outcomes(pair, a, b, scenario))
    out.seconds = time.monotonic() - start
    return out
