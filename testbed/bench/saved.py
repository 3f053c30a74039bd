"""A saved run (``testbed bench --json FILE``) read back, to render it again unmeasured.

``testbed bench --from-json FILE`` prints its tables and writes its plots and
markdown as the run itself would have: the docs and the README can be
regenerated from a kept run, and a run can be looked at again later.  The
ratios keep their recorded medians and spreads; whether a goal is met is
judged again from the median, against today's goals.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from testbed.bench.goals import GOALS, Verdict, base_key
from testbed.bench.placement import Placement
from testbed.bench.plan import Plan
from testbed.bench.results import Outcome, Row
from testbed.bench.runner import Report
from testbed.bench.stats import Spread
from testbed.errors import BenchUsageError

_GOALS = {g.key: g for g in GOALS}
_TUPLES = {"clients", "depths", "storm_sizes", "qemu_versions", "experiments", "transports"}


def load(path: Path) -> Report:
    """The run saved in ``path``; :class:`BenchUsageError` naming the file and what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise BenchUsageError(f"{path}: cannot read it: {err.strerror or err}") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BenchUsageError(f"{path}: not JSON: {err}") from err
    try:
        return report_of(data)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise BenchUsageError(f"{path}: not a saved bench run: {_what(err)}") from err


def report_of(data: dict[str, Any]) -> Report:
    outcome = Outcome(rows=[row_of(r) for r in data["results"]], extra=dict(data.get("extra", {})))
    return Report(
        machine=dict(data["machine"]),
        plan=plan_of(data["plan"]),
        outcome=outcome,
        verdicts=[verdict_of(k, v) for k, v in data["ratios"].items()],
        floor=dict(data.get("python_floor", {})),
        wall_s=float(data.get("wall_s", 0.0)),
    )


def plan_of(d: dict[str, Any]) -> Plan:
    """The plan as saved; fields this version does not know are dropped, ones it added
    since take their defaults."""
    known = {f.name for f in dataclasses.fields(Plan)}
    kw: dict[str, Any] = {}
    for k, v in d.items():
        if k not in known:
            continue
        if k == "qemu_placement":
            v = Placement(v)
        elif k in _TUPLES and v is not None:
            v = tuple(v)
        kw[k] = v
    return Plan(**kw)


def spread_of(d: dict[str, Any]) -> Spread:
    return Spread(median=float(d["median"]), low=float(d["min"]), high=float(d["max"]),
                  n=int(d["reps"]))  # fmt: skip


def row_of(d: dict[str, Any]) -> Row:
    return Row(
        experiment=str(d["experiment"]),
        transport=str(d["transport"]),
        setting=str(d["setting"]),
        figures={k: spread_of(v) for k, v in d.get("figures", {}).items()},
        skipped=str(d.get("skipped", "")),
        qemu_version=str(d.get("qemu_version", "")),
    )


def verdict_of(key: str, d: dict[str, Any]) -> Verdict:
    return Verdict(
        key=key,
        goal=_GOALS.get(base_key(key)),
        what=str(d["what"]),
        value=spread_of(d) if "median" in d else None,
        reason=str(d.get("not_measured", "")),
    )


def _what(err: Exception) -> str:
    if isinstance(err, KeyError):
        return f"no {err.args[0]!r}"
    return str(err)
