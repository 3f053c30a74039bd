"""Fixtures for the supervisor tests: the C helper, and running it supervised."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from supervise_helpers import Run

from testbed.broker import Policy
from testbed.pytest_plugin import require
from testbed.supervise import Supervisor
from testbed.supervise.seccomp import check_user_notification

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/supervise/helper.c, built once per session."""
    cc = shutil.which("gcc") or shutil.which("cc")
    require(cc is not None, "a C compiler (apt-get install gcc) for tests/supervise/helper.c")
    assert cc is not None
    out = tmp_path_factory.mktemp("helper") / "helper"
    subprocess.run(
        [cc, "-O1", "-Wall", "-Werror", "-pthread", "-o", str(out), str(HERE / "helper.c")],
        check=True,
        timeout=120,
    )
    return out


@pytest.fixture(scope="session")
def kernel() -> None:
    """Seccomp user notification with ADDFD_FLAG_SEND and WAIT_KILLABLE_RECV."""
    try:
        check_user_notification()
    except Exception as err:
        require(False, str(err))


@pytest.fixture
def run_supervised(helper: Path, kernel: None) -> Iterator[Run]:
    """Run the helper with ARGS under a Supervisor; (completed process, supervisor)."""
    sups: list[Supervisor] = []

    def run(
        *args: str | Path, policy: Policy | None = None, timeout: float = 30, **kw: object
    ) -> tuple[subprocess.CompletedProcess[str], Supervisor]:
        sup = Supervisor(policy, **kw)  # type: ignore[arg-type]
        sups.append(sup)
        proc = sup.popen([helper, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"helper {args} did not finish in {timeout}s: {out!r} {err!r}")
        sup.wait(10)
        done = subprocess.CompletedProcess(
            [str(helper), *map(str, args)], proc.returncode, out.decode(), err.decode()
        )
        return done, sup

    yield run
    for sup in sups:
        sup.close()
