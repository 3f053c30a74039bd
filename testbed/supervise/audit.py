"""Audit records of the seccomp front end: the broker's format plus ``via`` and ``tid``.

Adapter: the broker's :class:`~testbed.broker.AuditRecord` does not have
the optional ``via`` and ``tid`` fields yet (the broker hardening adds
them).  Until it does, this subclass adds them, and the broker's
:class:`~testbed.broker.AuditLog` writes it unchanged (``asdict`` takes
the subclass's fields).  It goes once the broker's record has the fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from testbed.broker import AuditRecord

VIA = "seccomp"


@dataclass(frozen=True, kw_only=True, slots=True)
class SeccompAuditRecord(AuditRecord):
    #: Which front end served the open (the hook's records will say "hook").
    via: str = VIA
    #: The thread that asked (``peer_pid`` is its thread group).
    tid: int = 0
