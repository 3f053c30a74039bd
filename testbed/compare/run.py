"""Running a scenario through every oracle and comparing what they opened."""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.compare.compare import MISMATCH, PairResult, compare_pair, overall, skipped
from testbed.compare.runners import fdset, model, patched, seccomp, stock
from testbed.compare.runners.common import Binaries, ImageInfo, OracleResult, Setup, prepare
from testbed.compare.scenarios import Scenario
from testbed.errors import TestbedError
from testbed.qemu import DEFAULT_VERSION

#: Every oracle, by name: a runner takes a Setup (which carries the binaries to use).
ORACLES: dict[str, Callable[[Setup], OracleResult]] = {
    "model": model.run,
    "patched": patched.run,
    "stock": stock.run,
    "fdset": fdset.run,
    "seccomp": seccomp.run,
}
#: The comparisons that decide a scenario's status (left, right).
PAIRS = (("model", "patched"), ("patched", "stock"), ("seccomp", "stock"), ("patched", "seccomp"))


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
    def status(self) -> str:
        return overall(self.pairs)

    def pair(self, left: str, right: str) -> PairResult:
        for p in self.pairs:
            if (p.left, p.right) == (left, right):
                return p
        raise KeyError((left, right))

    def to_json(self) -> dict[str, Any]:
        sc = self.scenario
        fd = self.oracles.get("fdset")
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
            **({"fdset": {**fd.to_json(), "ok": fd.ok, "error": fd.first_error}} if fd else {}),
            "fdset_ok": bool(fd and fd.ok),
            "fdset_error": fd.first_error if fd else "",
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
    if pair.status == MISMATCH or "refusal" in scenario.tags:
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
        status=MISMATCH,
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
            out.oracles[name] = ORACLES[name](setup)
        except (TestbedError, OSError) as err:
            out.oracles[name] = OracleResult(skipped=f"{type(err).__name__}: {err}")
    for left, right in PAIRS:
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
