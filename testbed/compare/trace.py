"""One normalised open, the unit every trace in a comparison is made of.

A trace from any source (the model's broker, patched QEMU's broker audit
log, stock QEMU's strace) becomes a list of :class:`Open`: the path relative
to the scenario directory, the flags as symbolic names without the ones that
say nothing about what is opened (``O_CLOEXEC``, ``O_LARGEFILE``), the mode
only for a create, the result as ``ok`` or an errno name, and whether the
open is a probe (QEMU's host_cdrom probe opens ``O_RDONLY|O_NONBLOCK`` and
closes again at once).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from testbed.errors import TraceRecordError


@dataclass(frozen=True, kw_only=True)
class Open:
    path: str
    flags: tuple[str, ...]
    mode: int | None = None
    result: str = "ok"
    probe: bool = False

    def __post_init__(self) -> None:
        if not self.flags:
            raise TraceRecordError(f"open of {self.path!r} has no flags (not even an access mode)")
        if self.result != "ok" and not self.result.startswith("E"):
            raise TraceRecordError(f"open result {self.result!r} is neither 'ok' nor an errno name")

    def line(self) -> str:
        """One line for diffs and reports: ``probe top.qcow2 O_RDONLY|O_NONBLOCK -> ok``."""
        kind = "probe" if self.probe else "open"
        mode = f" {self.mode:#o}" if self.mode is not None else ""
        return f"{kind} {self.path} {'|'.join(self.flags)}{mode} -> {self.result}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["flags"] = list(self.flags)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Open:
        return cls(
            path=str(data["path"]),
            flags=tuple(data["flags"]),
            mode=data.get("mode"),
            result=str(data.get("result", "ok")),
            probe=bool(data.get("probe", False)),
        )


def lines(trace: list[Open]) -> list[str]:
    return [o.line() for o in trace]
