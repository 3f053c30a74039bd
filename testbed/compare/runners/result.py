"""What one oracle did for a scenario: its trace, each operation's outcome, its logs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from testbed.compare.trace import Open


@dataclass(kw_only=True)
class OracleResult:
    """What one oracle did for a scenario."""

    trace: list[Open] = field(default_factory=list)
    #: (operation, "ok" or the error text), in order; "launch" first for QEMU.
    operations: list[tuple[str, str]] = field(default_factory=list)
    #: Set when the oracle could not run at all (missing binary, setup failed).
    skipped: str = ""
    seconds: float = 0.0
    log: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.skipped and all(res == "ok" for _, res in self.operations)

    @property
    def first_error(self) -> str:
        for op, res in self.operations:
            if res != "ok":
                return f"{op}: {res}"
        return self.skipped

    def to_json(self) -> dict[str, Any]:
        return {
            "trace": [o.to_json() for o in self.trace],
            "operations": [{"op": op, "result": res} for op, res in self.operations],
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "log": self.log,
            **self.extra,
        }
