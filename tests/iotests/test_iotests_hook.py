"""The mode wrappers, run against a stand-in QEMU (fake_qemu.c): no real QEMU needed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.iotests.modes import Mode, firmware_dirs, wrapper_env, write_wrapper
from testbed.iotests.runner import reap_brokers
from testbed.pytest_plugin import missing

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def fake_qemu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        missing("no C compiler (cc) to build the stand-in QEMU")
    exe = tmp_path_factory.mktemp("fake") / "fake-qemu"
    subprocess.run(
        [cc, "-O2", "-Wall", "-Werror", "-o", str(exe), str(HERE / "fake_qemu.c")], check=True
    )
    return exe


class Suite:
    """The directories the suite would give QEMU, and a run directory."""

    def __init__(self, root: Path) -> None:
        self.test_dir = root / "scratch"
        self.sock_dir = root / "sock"
        self.tmp_dir = root / "tmp"
        self.rundir = root / "run"
        self.cwd = root / "iotests"
        for d in (self.test_dir, self.sock_dir, self.tmp_dir, self.rundir, self.cwd):
            d.mkdir()

    def run(
        self, wrapper: Path, fake: Path, mode: Mode, *args: str, **env: str
    ) -> subprocess.CompletedProcess[str]:
        full = dict(os.environ)
        full.update(wrapper_env(mode, qemu=fake))
        full.update(
            TEST_DIR=str(self.test_dir),
            SOCK_DIR=str(self.sock_dir),
            TMPDIR=str(self.tmp_dir),
            TESTBED_IOTESTS_RUNDIR=str(self.rundir),
        )
        full.update(env)
        return subprocess.run(
            [str(wrapper), *args],
            cwd=self.cwd,
            env=full,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def jsonl(self, name: str) -> list[dict[str, object]]:
        path = self.rundir / name
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def suite(tmp_path: Path) -> Suite:
    return Suite(tmp_path)


def test_hooked_wrapper_serves_the_suites_directories_and_keeps_argv0(
    fake_qemu: Path, suite: Suite, tmp_path: Path
) -> None:
    wrapper = write_wrapper(tmp_path / "bin", Mode.HOOKED, qemu=fake_qemu, stock=None).path
    image = suite.test_dir / "t.qcow2"
    image.write_bytes(b"x")
    overlay_tmp = suite.tmp_dir / "vl.abc"
    overlay_tmp.write_bytes(b"x")
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"x")
    done = suite.run(
        wrapper,
        fake_qemu,
        Mode.HOOKED,
        str(image),
        str(overlay_tmp),
        str(outside),
        str(suite.cwd / "foo:bar"),
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # argv[0] is what the suite ran, so QEMU's "NAME:" prefixes match its filters
    assert lines[0] == f"argv0 {wrapper}"
    assert [x[2:] for x in lines if x.startswith("L ")] == [str(d) for d in firmware_dirs()]
    assert f"open {image} fd" in lines
    assert f"open {overlay_tmp} fd" in lines
    assert f"open {outside} errno 13" in lines  # not under a grant
    assert f"open {suite.cwd}/foo:bar errno 2" in lines  # cwd is granted read-only
    audit = suite.jsonl("audit.jsonl")
    assert [r["path"] for r in audit] == [
        str(image),
        str(overlay_tmp),
        str(outside),
        f"{suite.cwd}/foo:bar",
    ]
    launches = suite.jsonl("launches.jsonl")
    assert len(launches) == 1 and isinstance(launches[0]["broker_pid"], int)
    # the broker goes when its QEMU does
    assert reap_brokers(launches, suite.rundir / "audit.jsonl") == 0


def test_hooked_wrapper_leaves_no_broker_when_qemu_cannot_start(
    suite: Suite, tmp_path: Path, fake_qemu: Path
) -> None:
    wrapper = write_wrapper(tmp_path / "bin", Mode.HOOKED, qemu=fake_qemu, stock=None).path
    done = suite.run(
        wrapper, fake_qemu, Mode.HOOKED, TESTBED_IOTESTS_QEMU=str(tmp_path / "no-such-qemu")
    )
    assert done.returncode == 127
    assert "no-such-qemu" in done.stderr
    launches = suite.jsonl("launches.jsonl")
    assert len(launches) == 1
    pid = launches[0]["broker_pid"]
    assert isinstance(pid, int)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        # the broker is a child of the (now gone) wrapper; init reaps it
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.05)
    assert reap_brokers(launches, suite.rundir / "audit.jsonl") == 0


def test_hooked_wrapper_names_a_missing_setting(suite: Suite, tmp_path: Path) -> None:
    wrapper = write_wrapper(tmp_path / "bin", Mode.HOOKED, qemu=Path("/bin/true"), stock=None).path
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESTBED_IOTESTS_")}
    done = subprocess.run(
        [str(wrapper)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 127
    assert "TESTBED_IOTESTS_QEMU is not set" in done.stderr


def test_unhooked_wrapper_adds_firmware_and_no_hook(
    fake_qemu: Path, suite: Suite, tmp_path: Path
) -> None:
    wrapper = write_wrapper(tmp_path / "bin", Mode.UNHOOKED, qemu=fake_qemu, stock=None).path
    done = suite.run(wrapper, fake_qemu, Mode.UNHOOKED, "-machine", "none")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"argv0 {wrapper}"
    assert [x[2:] for x in lines if x.startswith("L ")] == [str(d) for d in firmware_dirs()]
    assert "arg -machine" in lines and not any(x.startswith("open ") for x in lines)
    assert len(suite.jsonl("launches.jsonl")) == 1
    assert suite.jsonl("audit.jsonl") == []


def test_reap_brokers_never_takes_a_reused_pid_for_a_broker(tmp_path: Path) -> None:
    # a process that has "broker" in its command line but is not this run's
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)", "broker"]
    other = subprocess.Popen(sleeper)
    try:
        launches: list[dict[str, object]] = [{"broker_pid": other.pid}]
        assert reap_brokers(launches, tmp_path / "audit.jsonl") == 0
        assert other.poll() is None  # not signalled
        ours = subprocess.Popen([*sleeper, "--audit", str(tmp_path / "audit.jsonl")])
        # the kernel sets the new command line a moment after Popen returns
        deadline = time.monotonic() + 10
        while b"--audit" not in Path(f"/proc/{ours.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the stand-in broker never started"
            time.sleep(0.01)
        assert reap_brokers([{"broker_pid": ours.pid}], tmp_path / "audit.jsonl") == 1
        assert ours.wait(timeout=10) == -9
    finally:
        other.kill()
        other.wait()
