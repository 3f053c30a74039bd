"""One test run's outcome, what its QEMUs did, and the JSON file of a whole run."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from testbed.errors import IotestsError


class Status(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    NOT_RUN = "not run"


@dataclass(frozen=True)
class Refusal:
    """A request the broker did not answer with a descriptor."""

    path: str
    flags: tuple[str, ...]
    result: int
    reason: str


@dataclass(frozen=True)
class TestRun:
    """One ``check -FMT TEST`` under one mode of one QEMU version."""

    __test__ = False  # not a pytest class

    version: str
    mode: str
    format: str
    test: str
    status: Status
    seconds: float
    reason: str = ""  # why not run / why failed (check's description, or ours)
    diff: tuple[str, ...] = ()  # check's diff of the reference against the output
    launches: int = 0  # qemu-system starts seen by the wrapper
    requests: int = 0  # broker (or supervisor) audit records
    refusals: tuple[Refusal, ...] = ()
    brokers_left: int = 0  # brokers still alive after the test (killed by us)
    first_answer_s: tuple[float, ...] = ()  # per launch: launch -> first audit record
    latency_us: tuple[float, ...] = field(default=(), repr=False)
    attempts: int = 1  # > 1: it failed first and was run again (see earlier_failures)
    earlier_failures: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        d["refusals"] = [asdict(r) for r in self.refusals]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TestRun:
        try:
            return cls(
                version=str(d["version"]),
                mode=str(d["mode"]),
                format=str(d["format"]),
                test=str(d["test"]),
                status=Status(d["status"]),
                seconds=float(d.get("seconds", 0.0)),
                reason=str(d.get("reason", "")),
                diff=tuple(d.get("diff", ())),
                launches=int(d.get("launches", 0)),
                requests=int(d.get("requests", 0)),
                refusals=tuple(
                    Refusal(r["path"], tuple(r["flags"]), int(r["result"]), r["reason"])
                    for r in d.get("refusals", ())
                ),
                brokers_left=int(d.get("brokers_left", 0)),
                first_answer_s=tuple(d.get("first_answer_s", ())),
                latency_us=tuple(d.get("latency_us", ())),
                attempts=int(d.get("attempts", 1)),
                earlier_failures=tuple(d.get("earlier_failures", ())),
            )
        except (KeyError, ValueError, TypeError) as err:
            raise IotestsError(f"bad iotests result record {d!r}: {err}") from err


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


@dataclass(frozen=True)
class ModeSummary:
    version: str
    mode: str
    counts: dict[str, int]  # status -> number of runs
    seconds: float
    launches: int
    requests: int
    refusals: int
    brokers_left: int
    first_answer_median_s: float | None
    latency_median_us: float | None


def summarise(runs: Iterable[TestRun]) -> list[ModeSummary]:
    groups: dict[tuple[str, str], list[TestRun]] = {}
    for r in runs:
        groups.setdefault((r.version, r.mode), []).append(r)
    out = []
    for (version, mode), rs in groups.items():
        counts = {s.value: sum(1 for r in rs if r.status is s) for s in Status}
        out.append(
            ModeSummary(
                version=version,
                mode=mode,
                counts=counts,
                seconds=round(sum(r.seconds for r in rs), 1),
                launches=sum(r.launches for r in rs),
                requests=sum(r.requests for r in rs),
                refusals=sum(len(r.refusals) for r in rs),
                brokers_left=sum(r.brokers_left for r in rs),
                first_answer_median_s=median([x for r in rs for x in r.first_answer_s]),
                latency_median_us=median([x for r in rs for x in r.latency_us]),
            )
        )
    return out


def write_json(path: Path, runs: Sequence[TestRun], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": meta,
        "summary": [asdict(s) for s in summarise(runs)],
        "results": [r.to_json() for r in runs],
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)  # a reader never sees half a file


def read_json(path: Path) -> tuple[list[TestRun], dict[str, Any]]:
    try:
        doc = json.loads(path.read_text())
        return [TestRun.from_json(d) for d in doc["results"]], dict(doc.get("meta", {}))
    except (OSError, ValueError, KeyError, TypeError, IotestsError) as err:
        raise IotestsError(f"{path}: not an iotests result file ({err})") from err


__all__ = [
    "ModeSummary",
    "Refusal",
    "Status",
    "TestRun",
    "read_json",
    "summarise",
    "write_json",
]
