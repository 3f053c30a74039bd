"""``answer``: Policy + Gate + AuditLog as a second front end (a seccomp supervisor) uses them."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest

from testbed.broker import VIA_SECCOMP, AuditLog, Gate, Policy, answer, read_audit
from testbed.errors import AuditWriteError
from testbed.protocol import InvalidRequest, OpenRequest
from tests.conftest import open_fds


def test_a_second_front_end_gets_its_fields_in_the_log(grant_dir: Path, tmp_path: Path) -> None:
    gate = Gate(Policy.from_grants(ro=[grant_dir]))
    audit = AuditLog(tmp_path / "audit.jsonl")
    request = OpenRequest(path=os.fsencode(str(grant_dir / "disk.img")), flags=0, mode=0)
    out = answer(gate, audit, request, conn=3, peer_pid=77, via=VIA_SECCOMP, tid=78)
    assert out.result == 0 and out.fd is not None
    assert os.read(out.fd, 4) == b"disk"
    os.close(out.fd)
    bad = InvalidRequest(path=b"/a\0b", flags=0, mode=0, errno=errno.EINVAL, reason="NUL")
    assert answer(gate, audit, bad, conn=3, peer_pid=77, via=VIA_SECCOMP).result == -errno.EINVAL
    audit.close()
    gate.close()
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(r["via"], r.get("tid"), r["result"]) for r in lines] == [
        ("seccomp", 78, 0),
        ("seccomp", None, -errno.EINVAL),
    ]
    assert read_audit(tmp_path / "audit.jsonl")[0].tid == 78


def test_an_unwritable_log_refuses_and_closes_the_fd(
    grant_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="testbed.broker")
    gate = Gate(Policy.from_grants(ro=[grant_dir]))
    audit = AuditLog("/dev/full")  # every write fails with ENOSPC
    request = OpenRequest(path=os.fsencode(str(grant_dir / "disk.img")), flags=0, mode=0)
    os.close(gate.handle(request).fd or -1)  # the gate's own fds are open from here on
    before = open_fds()
    for _ in range(3):
        out = answer(gate, audit, request, conn=1, peer_pid=1)
        assert out.result == -errno.EIO and out.fd is None
        assert "not audited" in out.reason
    assert open_fds() == before  # the opened fd was closed, not leaked
    assert [r.result for r in audit.snapshot()] == [-errno.EIO] * 3
    assert sum("write failed" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(AuditWriteError) as info:
        audit.write(audit.snapshot()[0])
    assert info.value.errno == errno.ENOSPC and info.value.path == "/dev/full"
    audit.close()
    gate.close()
