"""A guest session's state before any boot: phase, writer, impossible configs (no QEMU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.errors import GuestError, GuestUsageError
from testbed.guest.sandbox import Sandbox
from testbed.guest.session import Phase, Session, SessionConfig, Writer


def test_a_new_session_has_no_writer_and_is_not_booted(tmp_path: Path) -> None:
    s = Session(SessionConfig(fmt="raw", workdir=tmp_path))
    assert s.phase is Phase.NEW and not s.booted
    assert s.writer is None and s.writer_done


def test_finishing_a_writer_never_started_says_so(tmp_path: Path) -> None:
    s = Session(SessionConfig(fmt="raw", workdir=tmp_path))
    with pytest.raises(GuestError, match="no writer is running"):
        s.finish_writer()


def test_a_running_writer_is_not_done_until_its_end_is_seen(tmp_path: Path) -> None:
    s = Session(SessionConfig(fmt="raw", workdir=tmp_path))
    s.writer = Writer(last=9, started=0.0)
    assert not s.writer_done
    with pytest.raises(GuestError, match="already running"):
        s.start_writer(1)
    s.writer = Writer(last=9, started=0.0, done=True)
    assert s.writer_done


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"supervise": True, "hook": True}, "use hook=False"),
        ({"supervise": True, "hook": False, "sandbox": Sandbox.NAMESPACE}, "not the mount"),
    ],
)
def test_impossible_configs_fail_before_anything_is_made(
    tmp_path: Path, options: dict[str, object], message: str
) -> None:
    work = tmp_path / "work"
    s = Session(SessionConfig(fmt="raw", workdir=work, **options))  # type: ignore[arg-type]
    with pytest.raises(GuestUsageError, match=message):
        s.start()
    assert not work.exists() and s.phase is Phase.NEW
    assert isinstance(GuestUsageError("x"), ValueError)
