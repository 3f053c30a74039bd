"""The seccomp ping-pong server: the C child's opens really go through the supervisor.

Needs a C compiler and a kernel with seccomp user notification.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from testbed.bench.climit import CMode, compile_c_limit
from testbed.bench.env import Env
from testbed.bench.placement import Placement, cpus_for
from testbed.bench.runner import make_file
from testbed.bench.servers import SERVERS
from testbed.bench.servers.c_limit import CSession
from testbed.bench.servers.seccomp import supervise_argv
from testbed.errors import CBenchError, KernelFeatureError
from testbed.pytest_plugin import missing, require
from testbed.supervise.seccomp import check_user_notification


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    require(shutil.which("cc") is not None, "a C compiler (cc) for c_limit")
    try:
        check_user_notification()
    except KernelFeatureError as err:
        missing(str(err))
    work = tmp_path_factory.mktemp("seccomp")
    return Env(work_dir=work, file=make_file(work / "files"), warmup=20, qemu_version="7.2",
               c_limit=compile_c_limit(work))  # fmt: skip


@pytest.mark.parametrize("placement", SERVERS.get("seccomp").placements or ())
def test_the_supervised_child_opens_in_a_loop(env: Env, placement: Placement) -> None:
    session = SERVERS.get("seccomp").open(env, cpus_for(placement))
    r = session.round(0.1)
    assert r.ops >= 1 and 0.09 < r.seconds < 5
    assert 0 < r.p50_us <= r.p99_us and r.broker_cpu_s is None


def test_its_opens_are_decided_by_the_supervisors_policy(env: Env, tmp_path: Path) -> None:
    # the same child, but the supervisor grants another directory than the file's:
    # its open is refused, so it is the supervisor that answers the child's opens
    elsewhere = dataclasses.replace(env, file=make_file(tmp_path / "elsewhere"))
    session = CSession(
        env, cpus_for(Placement.UNPINNED), CMode.FLOOR, wrapper=supervise_argv(elsewhere)
    )
    with pytest.raises(CBenchError, match="open: Permission denied"):
        session.round(0.05)
