"""Waiting for QMP events with a timeout, for the guest's block jobs.

This belongs in :mod:`testbed.qemu.machine` (a ``Machine.wait_event``); it
lives here until the lead moves it, as a subclass that only adds methods.

QEMU stamps every event with its own wall clock, so the times in
:class:`QMPEvent` are when QEMU emitted it, not when we read it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from testbed.errors import QEMUError, WaitTimeout
from testbed.qemu import Machine, MachineConfig


@dataclass(frozen=True, kw_only=True)
class QMPEvent:
    """One event as QEMU sent it."""

    name: str
    data: Mapping[str, Any] = field(default_factory=dict)
    #: QEMU's wall-clock timestamp (seconds since the epoch)
    time: float = 0.0

    @classmethod
    def from_message(cls, msg: Mapping[str, Any]) -> QMPEvent:
        stamp = msg.get("timestamp") or {}
        seconds = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
        return cls(name=str(msg.get("event", "")), data=dict(msg.get("data") or {}), time=seconds)

    def to_json(self, *, since: float | None = None) -> dict[str, object]:
        out: dict[str, object] = {"event": self.name, "data": dict(self.data)}
        out["time"] = round(self.time - since, 4) if since is not None else self.time
        return out


@dataclass(frozen=True, kw_only=True)
class EventPattern:
    """An event name and values its ``data`` must hold (a subset match)."""

    name: str
    data: Mapping[str, Any] = field(default_factory=dict)

    def matches(self, event: QMPEvent) -> bool:
        return event.name == self.name and all(event.data.get(k) == v for k, v in self.data.items())

    def __str__(self) -> str:
        if not self.data:
            return self.name
        return f"{self.name} {dict(self.data)}"


class EventMachine(Machine):
    """A :class:`Machine` that can wait for QMP events.

    Every event read is kept in :attr:`seen` (in order); events no waiter
    has taken yet stay pending, so a wait for B never loses an A that came
    first and a later wait for A finds it.
    """

    def __init__(self, config: MachineConfig) -> None:
        super().__init__(config)
        self.seen: list[QMPEvent] = []
        self._pending: list[QMPEvent] = []

    def wait_event(
        self,
        want: EventPattern,
        *,
        timeout: float,
        what: str,
        fail: Sequence[EventPattern] = (),
    ) -> QMPEvent:
        """The first pending or next event matching ``want``.

        Raises :class:`QEMUError` naming ``what`` and the event if an event
        matching one of ``fail`` comes first, :class:`testbed.errors.WaitTimeout` (naming ``what``
        and the event) when ``timeout`` runs out.
        """
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self._pending):
                if want.matches(event):
                    del self._pending[i]
                    return event
                if any(p.matches(event) for p in fail):
                    del self._pending[i]
                    raise QEMUError(f"{what}: QEMU sent {event.name} {dict(event.data)}")
            left = deadline - time.monotonic()
            label = f"{what} (event {want})"
            if left <= 0:
                raise WaitTimeout(label, timeout)
            self._require_running(label)
            msg = self._run(self._qmp.events.get(), left, label)
            event = QMPEvent.from_message(msg)
            self.seen.append(event)
            self._pending.append(event)
