"""The broker: the privileged side of -open-hook-fd (the role libvirt plays).

``Policy`` says what may be opened, ``Gate`` opens it safely (openat2 beneath
the grant), ``Broker`` serves many peers, ``AuditLog`` records every answer.
"""

from testbed.broker.audit import AuditLog, AuditRecord, read_audit
from testbed.broker.gate import Gate, Outcome
from testbed.broker.policy import Access, Grant, Policy
from testbed.broker.server import Broker, listen_unix, serve_socketpair

__all__ = [
    "Access",
    "AuditLog",
    "AuditRecord",
    "Broker",
    "Gate",
    "Grant",
    "Outcome",
    "Policy",
    "listen_unix",
    "read_audit",
    "serve_socketpair",
]
