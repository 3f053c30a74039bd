"""run_one against a stand-in ``check``: status, not-run reason, timeout, leftovers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from testbed.iotests.builds import QemuBuild, SuiteTools
from testbed.iotests.modes import Mode
from testbed.iotests.results import Status
from testbed.iotests.runner import Layout, RunConfig, run_all, run_one
from testbed.iotests.selection import Language, Planned, SuiteTest

CHECK = """#!/usr/bin/env python3
import os, subprocess, sys, time
name = sys.argv[-1]
what = os.environ["FAKE_CHECK"]
print("1..1")
if what == "pass":
    print(f"ok qcow2 {name}")
elif what == "notrun":
    open(os.path.join(os.environ["TEST_DIR"], f"{name}.notrun"), "w").write("qed not available")
    print(f"ok qcow2 {name} # SKIP")
elif what == "fail":
    print(f"not ok qcow2 {name}")
    print("-expected\\n+got", file=sys.stderr)
elif what == "leftover":
    # a daemon the test forgot: it must not outlive the run
    p = subprocess.Popen(["sleep", "300"])
    open(os.path.join(os.environ["TEST_DIR"], "pid"), "w").write(str(p.pid))
    print(f"ok qcow2 {name}")
elif what == "meet":
    # pass only if the other test of the pair runs at the same time
    shared = os.environ["FAKE_SHARED"]
    open(os.path.join(shared, name), "w").close()
    other = {"001": "002", "002": "001"}[name]
    for _ in range(100):
        if os.path.exists(os.path.join(shared, other)):
            print(f"ok qcow2 {name}")
            break
        time.sleep(0.05)
    else:
        print(f"not ok qcow2 {name}")
elif what == "hang":
    p = subprocess.Popen(["sleep", "300"])
    open(os.path.join(os.environ["TEST_DIR"], "pid"), "w").write(str(p.pid))
    time.sleep(300)
"""


@pytest.fixture
def cfg(tmp_path: Path) -> RunConfig:
    layout = Layout("7.2", tmp_path / "7.2")
    layout.iotests.mkdir(parents=True)
    check = layout.iotests / "check"
    check.write_text(CHECK)
    check.chmod(0o755)
    tool = Path("/bin/true")
    return RunConfig(
        build=QemuBuild("7.2", "1:7.2+dfsg-7+deb12u18", tmp_path / "build"),
        tools=SuiteTools(tool, tool, tool, tool, "test"),
        layout=layout,
        stock=None,
        timeout=3,
        retries=0,
    )


def one(cfg: RunConfig, what: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Status, str, Path]:
    monkeypatch.setenv("FAKE_CHECK", what)
    t = SuiteTest("042", cfg.layout.iotests / "042", Language.BASH, frozenset(), (), True)
    r = run_one(cfg, Mode.UNHOOKED, Path("/bin/true"), Planned(t, "qcow2"))
    assert (r.version, r.mode, r.format, r.test) == ("7.2", "unhooked", "qcow2", "042")
    return r.status, r.reason, cfg.layout.rundir(Mode.UNHOOKED, "qcow2", "042") / "scratch"


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_pass_fail_and_not_run(cfg: RunConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    assert one(cfg, "pass", monkeypatch)[:2] == (Status.PASS, "")
    assert one(cfg, "notrun", monkeypatch)[:2] == (Status.NOT_RUN, "qed not available")
    assert one(cfg, "fail", monkeypatch)[:2] == (Status.FAIL, "output mismatch")


def test_timeout_names_the_test_and_ends_its_processes(
    cfg: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = time.monotonic()
    status, reason, scratch = one(cfg, "hang", monkeypatch)
    assert status is Status.FAIL
    assert reason == "timed out after 3s running iotest 042 (qcow2, unhooked, QEMU 7.2)"
    assert time.monotonic() - start < 30
    assert not alive(int((scratch / "pid").read_text()))


def test_what_a_test_leaves_running_is_ended(
    cfg: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, _, scratch = one(cfg, "leftover", monkeypatch)
    assert status is Status.PASS
    pid = int((scratch / "pid").read_text())
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


@pytest.mark.parametrize("jobs", [1, 2])
def test_jobs_run_tests_at_once_and_keep_plan_order(
    cfg: RunConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, jobs: int
) -> None:
    """001 and 002 pass only if each sees the other running: with --jobs 2, not with 1."""
    monkeypatch.setenv("FAKE_CHECK", "meet")
    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setenv("FAKE_SHARED", str(shared))
    plan = [
        Planned(SuiteTest(n, cfg.layout.iotests / n, Language.BASH, frozenset(), (), True), "qcow2")
        for n in ("001", "002")
    ]
    seen: list[tuple[str, int, int]] = []
    runs = run_all(
        cfg, [Mode.UNHOOKED], plan, on_result=lambda r, n, t: seen.append((r.test, n, t)),
        jobs=jobs,
    )  # fmt: skip
    assert [r.test for r in runs] == ["001", "002"]  # plan order, whatever finished first
    assert sorted(n for _, n, _ in seen) == [1, 2] and {t for _, _, t in seen} == {2}
    # one at a time, 001 waits for a 002 that has not started (002 then finds 001's mark)
    want = [Status.PASS, Status.PASS] if jobs == 2 else [Status.FAIL, Status.PASS]
    assert [r.status for r in runs] == want
