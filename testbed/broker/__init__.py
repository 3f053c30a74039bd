"""The broker: the privileged side of -open-hook-fd (the role libvirt plays).

Public API, for the hook's event loop here and for any other front end (a
seccomp supervisor reuses the first four unchanged):

``Policy``, ``Grant``, ``Access``
    What may be opened: grants of files or directories, ``ro``/``rw``/
    ``create``, and per-grant rules (``symlinks``, ``devices``,
    ``hardlinks``, ``directories``, ``cross_mounts``) that relax one
    guarantee each.  ``Policy.from_toml``, ``Policy.from_grants``.
``Gate(policy).handle(request) -> Outcome``
    The decision and the open, for an ``OpenRequest`` or ``InvalidRequest``
    (``testbed.protocol``).  ``Outcome.result`` is 0 with ``Outcome.fd`` (the
    caller owns it) or ``-errno`` with ``Outcome.reason``.  Never raises for
    anything a peer can send.  ``Gate.close()`` releases its root fds.
    The fast path: ``Gate.remember(request, outcome)`` keeps a granted
    open's decision under the request frame's bytes (``Gate.decisions``,
    bounded), ``Gate.open_decided(decision)`` replays it (an fd, or -1: ask
    ``handle``); the hook's loop uses both, another front end need not.
``AuditLog(path, keep=...)``, ``AuditRecord``
    One strict-JSON line per request.  ``AuditLog.write`` raises
    ``testbed.errors.AuditWriteError`` when the record cannot be written;
    the request must then be refused.  ``AuditRecord`` has ``via`` ("hook"
    by default; a seccomp supervisor passes "seccomp") and ``tid`` (the
    caller's thread id, when known).
``answer(gate, audit, request, *, conn, peer_pid, via="hook", tid=None) -> Outcome``
    ``Gate.handle`` plus the audit record plus failing closed (``-EIO``
    when the record cannot be written): what every front end does.
``Broker``, ``serve_socketpair``, ``listen_unix``
    The hook's front end: an epoll loop serving many peers with bounded
    memory and descriptors per peer (see ``testbed.broker.server``).
``read_audit(path)``
    The records of an audit file.

docs/broker.md states the security model and the ceilings.
"""

from testbed.broker.answer import answer
from testbed.broker.audit import VIA_HOOK, VIA_SECCOMP, AuditLog, AuditRecord, read_audit
from testbed.broker.gate import Gate, Outcome
from testbed.broker.policy import Access, Grant, Policy
from testbed.broker.server import Broker, Runstate, listen_unix, serve_socketpair

__all__ = [
    "VIA_HOOK",
    "VIA_SECCOMP",
    "Access",
    "AuditLog",
    "AuditRecord",
    "Broker",
    "Gate",
    "Grant",
    "Outcome",
    "Policy",
    "Runstate",
    "answer",
    "listen_unix",
    "read_audit",
    "serve_socketpair",
]
