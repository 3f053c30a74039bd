"""One request, decided, audited and failed closed: what every front end does.

The hook's event loop (:mod:`testbed.broker.server`) and any other front
end (a seccomp supervisor) call :func:`answer` and then deliver the outcome
their own way; the caller owns ``outcome.fd``.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from dataclasses import replace

from testbed.broker.audit import VIA_HOOK, AuditLog, AuditRecord
from testbed.broker.gate import Gate, Outcome
from testbed.errors import AuditWriteError
from testbed.protocol import InvalidRequest, OpenRequest
from testbed.protocol.flags import flag_names

#: What a request whose record could not be written is answered.
UNAUDITED_ERRNO = errno.EIO

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=256)
def names(flags: int) -> tuple[str, ...]:
    """``flag_names`` as a tuple, cached (a peer reuses a handful of flag sets)."""
    return tuple(flag_names(flags))


def answer(
    gate: Gate,
    audit: AuditLog,
    request: OpenRequest | InvalidRequest,
    *,
    conn: int,
    peer_pid: int,
    via: str = VIA_HOOK,
    tid: int | None = None,
) -> Outcome:
    """Decide ``request`` with ``gate`` and record it in ``audit`` before answering.

    If the record cannot be written, the fd (if any) is closed and the
    answer is ``-EIO``: nothing is granted that the log does not show.
    """
    auditing = audit.active
    start = time.perf_counter_ns() if auditing else 0
    try:
        outcome = gate.handle(request)
    except OSError as err:  # anything the gate did not foresee is still an errno
        outcome = Outcome.failed(err, f"unexpected: {err}")
    except Exception as err:  # a bug in the gate refuses; it never ends the broker
        log.exception("deciding %r failed", request)
        outcome = Outcome(result=-errno.EIO, reason=f"internal error: {err!r}")
    if not auditing:
        return outcome
    return audited(
        audit, request, outcome, start=start, conn=conn, peer_pid=peer_pid, via=via, tid=tid
    )


def audited(
    audit: AuditLog,
    request: OpenRequest | InvalidRequest,
    outcome: Outcome,
    *,
    start: int,
    conn: int,
    peer_pid: int,
    via: str = VIA_HOOK,
    tid: int | None = None,
) -> Outcome:
    """Record ``outcome`` for ``request`` in ``audit``: ``outcome``, or ``-EIO`` if that failed.

    ``start`` is the ``perf_counter_ns`` at which deciding began.  The one
    place a record is made, for :func:`answer` and the broker's fast path
    alike, so both write the same line for the same request.
    """
    record = AuditRecord(
        time=time.time(),
        conn=conn,
        peer_pid=peer_pid,
        path=request.path.decode("utf-8", "surrogateescape"),
        flags=request.flags,
        flag_names=names(request.flags),
        mode=request.mode,
        result=outcome.result,
        latency_us=round((time.perf_counter_ns() - start) / 1000, 1),
        reason=outcome.reason,
        via=via,
        tid=tid,
    )
    try:
        audit.write(record)
    except AuditWriteError as err:
        if outcome.fd is not None:
            os.close(outcome.fd)
        outcome = Outcome(result=-UNAUDITED_ERRNO, reason=f"not audited: {err}")
        audit.keep(replace(record, result=outcome.result, reason=outcome.reason))
    return outcome
