"""The broker's audit log: one JSON object per request, in arrival order.

The comparison reads this log as QEMU's trace, so a record is written (and
flushed) for every request the broker answers, refusals included, before
the next request is looked at.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditRecord:
    """One answered request.  ``flags`` is the integer from the wire.

    ``latency_us`` is the broker's own time for the request: from its
    decoding to the decision (the open done), measured before the reply is
    sent, because the record is written first.
    """

    time: float
    conn: int
    peer_pid: int
    path: str
    flags: int
    flag_names: tuple[str, ...]
    mode: int
    result: int
    latency_us: float
    reason: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> AuditRecord:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["flag_names"] = tuple(fields.get("flag_names", ()))
        return cls(**fields)


class AuditLog:
    """Where records go: an in-memory list and/or a JSON-lines file."""

    def __init__(self, path: str | Path | None = None, *, keep: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self._file: IO[str] | None = None
        if self.path is not None:
            self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._keep = keep
        self._lock = threading.Lock()
        self.records: list[AuditRecord] = []

    @property
    def active(self) -> bool:
        """Whether records go anywhere (the broker skips building them if not)."""
        return self._keep or self._file is not None

    def write(self, record: AuditRecord) -> None:
        with self._lock:
            if self._keep:
                self.records.append(record)
            if self._file is not None:
                self._file.write(record.to_json() + "\n")

    def snapshot(self) -> list[AuditRecord]:
        with self._lock:
            return list(self.records)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_audit(path: str | Path) -> list[AuditRecord]:
    """The records of a JSON-lines audit file, in order."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                records.append(AuditRecord.from_mapping(json.loads(line)))
    return records
