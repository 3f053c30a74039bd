"""The broker's audit log: one JSON object per request, in arrival order.

The comparison reads this log as QEMU's trace, so a record is written for
every request the broker answers, refusals included, before the reply is
sent.  Every line is strict JSON (ASCII only, no lone surrogates): a name
that is not valid UTF-8 is written as a readable ``path`` (undecodable bytes
shown as U+FFFD) plus its exact bytes in ``path_hex``.

A record that cannot be written raises :class:`~testbed.errors.AuditWriteError`
and the front end refuses the request (an unaudited open is not allowed).
The log says so once per episode of failures, and once more when writes
succeed again.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from testbed.errors import AuditWriteError

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger("testbed.broker")

#: Front ends that answer requests (the ``via`` field of a record).
VIA_HOOK = "hook"
VIA_SECCOMP = "seccomp"


def _strict(text: str) -> str:
    """``text`` without lone surrogates (which strict JSON parsers reject)."""
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditRecord:
    """One answered request.  ``flags`` is the integer from the wire.

    ``path`` is the name as the peer sent it, undecodable bytes kept as
    surrogates (``path_bytes`` gives the bytes back).  ``latency_us`` is the
    broker's own time for the request: from its decoding to the decision
    (the open done), measured before the reply is sent.  ``via`` names the
    front end that received the request; ``tid`` is the caller's thread id
    when the front end knows it (a seccomp supervisor does, the hook does not).
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
    via: str = VIA_HOOK
    tid: int | None = None

    @property
    def path_bytes(self) -> bytes:
        return self.path.encode("utf-8", "surrogateescape")

    def json_line(self) -> str:
        """The record as one line of the audit log (strict JSON, no newline)."""
        # json (and pathlib below) are imported where used: a broker that
        # keeps no audit file does not pay for them at start-up, which a
        # hooked QEMU waits for.
        import json

        data: dict[str, Any] = {
            "time": self.time,
            "conn": self.conn,
            "peer_pid": self.peer_pid,
            "path": self.path,
            "flags": self.flags,
            "flag_names": self.flag_names,
            "mode": self.mode,
            "result": self.result,
            "latency_us": self.latency_us,
            "reason": _strict(self.reason),
            "via": self.via,
        }
        if not self.path.isascii():
            raw = self.path_bytes
            data["path"] = raw.decode("utf-8", "replace")
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                data["path_hex"] = raw.hex()
        if self.tid is not None:
            data["tid"] = self.tid
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> AuditRecord:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["flag_names"] = tuple(fields.get("flag_names", ()))
        if "path_hex" in data:
            fields["path"] = bytes.fromhex(data["path_hex"]).decode("utf-8", "surrogateescape")
        return cls(**fields)


class AuditLog:
    """Where records go: an in-memory list (``keep``) and/or a JSON-lines file.

    The file is written with one ``write(2)`` per record on an ``O_APPEND``
    descriptor, with no user-space buffer, so a failed write leaves nothing
    behind to be flushed later under a record that was refused; a torn
    (partly written) line is cut off again.  The in-memory list grows with
    every request: it is for tests and in-process use, not a long-lived broker.
    """

    def __init__(self, path: str | Path | None = None, *, keep: bool = True) -> None:
        self.path: Path | None = None
        if path is not None:
            from pathlib import Path

            self.path = Path(path)
        self._fd: int | None = None
        if self.path is not None:
            self._fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640
            )
        self._keep = keep
        self._lock = threading.Lock()
        self.records: list[AuditRecord] = []
        #: Records refused in the current episode of write failures (0: none).
        self.failed_writes = 0

    @property
    def active(self) -> bool:
        """Whether records go anywhere (the broker skips building them if not)."""
        return self._keep or self._fd is not None

    def write(self, record: AuditRecord) -> None:
        """Record ``record``; raise :class:`AuditWriteError` if the file write failed.

        On failure nothing is kept: the caller decides what it answers
        instead and may :meth:`keep` a record of that.
        """
        with self._lock:
            if self._fd is not None:
                try:
                    self._append(self._fd, (record.json_line() + "\n").encode())
                except OSError as err:
                    self._failed(err)
                    raise AuditWriteError(
                        str(self.path), err.errno or 0, f"write failed: {err.strerror}"
                    ) from err
                if self.failed_writes:
                    log.warning(
                        "audit log %s: writable again after %d refused request(s)",
                        self.path,
                        self.failed_writes,
                    )
                    self.failed_writes = 0
            if self._keep:
                self.records.append(record)

    def keep(self, record: AuditRecord) -> None:
        """Add ``record`` to the in-memory list only (what was answered instead)."""
        if self._keep:
            with self._lock:
                self.records.append(record)

    @staticmethod
    def _append(fd: int, line: bytes) -> None:
        done = os.write(fd, line)
        if done == len(line):
            return
        try:
            while done < len(line):
                done += os.write(fd, line[done:])
        except OSError:
            # Cut the torn line off, so that every line left is one record.
            end = os.lseek(fd, 0, os.SEEK_END)
            os.ftruncate(fd, end - done)
            raise

    def _failed(self, err: OSError) -> None:
        if not self.failed_writes:
            log.error(
                "audit log %s: write failed (%s); refusing every request until it works again",
                self.path,
                err.strerror,
            )
        self.failed_writes += 1

    def snapshot(self) -> list[AuditRecord]:
        with self._lock:
            return list(self.records)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_audit(path: str | Path) -> list[AuditRecord]:
    """The records of a JSON-lines audit file, in order."""
    import json

    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                records.append(AuditRecord.from_mapping(json.loads(line)))
    return records
