"""Audit records of the seccomp front end: the broker's format plus a few fields.

``via`` and ``tid`` say who served and who asked; ``resolved`` and
``dirfd`` say where the name as given led.

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
    #: ``path`` is the name as the caller gave it (relative names too, as
    #: strace shows them); this is the absolute name the policy decided on.
    resolved: str = ""
    #: The directory fd a relative ``path`` is relative to (-100: the cwd).
    dirfd: int = -100
