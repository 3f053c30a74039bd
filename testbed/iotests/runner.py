"""Lay out a build-like tree for QEMU's ``check`` and run one test at a time in it.

``check`` (7.2 and later) finds its tests next to itself and the ``qemu``
Python package in ``../../python``; its binaries come from ``QEMU_PROG``,
``QEMU_IMG_PROG``, ``QEMU_IO_PROG``, ``QEMU_NBD_PROG`` and ``QSD_PROG``.
The harness copies ``tests/qemu-iotests`` and ``python`` of the build's
source tree into ``<work>/<version>/tree`` (the suite writes
``.last-elapsed-cache`` and other files next to itself; the shared source
cache stays untouched) and runs ``check -tap -FMT TEST`` there, one test
per process, so that each run has its own timeout, its own TEST_DIR (the
broker's grant) and its own audit file.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import IotestsError
from testbed.iotests.builds import QemuBuild, SuiteTools
from testbed.iotests.divergences import explain
from testbed.iotests.modes import Mode, wrapper_env, write_wrapper
from testbed.iotests.results import Refusal, Status, TestRun
from testbed.iotests.selection import Planned

#: How long a test may take before it is killed and counted as a failure.
DEFAULT_TIMEOUT = 600.0

#: How long a broker may outlive its QEMU before it counts as left behind.
BROKER_GRACE = 3.0


@dataclass(frozen=True)
class Layout:
    """The build-like directory one version's suite runs in."""

    version: str
    root: Path  # <work>/<version>

    @property
    def iotests(self) -> Path:
        return self.root / "tree" / "tests" / "qemu-iotests"

    @property
    def bindir(self) -> Path:
        return self.root / "bin"

    def rundir(self, mode: Mode, fmt: str, test: str) -> Path:
        return self.root / "runs" / mode.value / fmt / test


def lay_out(build: QemuBuild, work: Path) -> Layout:
    """Copy the suite out of ``build``'s source tree (once per source version)."""
    src = build.source_tree
    if not (src / "tests" / "qemu-iotests" / "check").is_file():
        raise IotestsError(
            f"QEMU {build.version}: no source tree with tests/qemu-iotests/check at {src} "
            "(scripts/build-qemu.sh --fetch-only unpacks it)"
        )
    # absolute: QEMU_PROG and TEST_DIR are used from the suite's directory
    layout = Layout(build.version, work.resolve() / build.version)
    tree = layout.root / "tree"
    stamp = tree / ".source-version"
    if not (stamp.is_file() and stamp.read_text() == build.source_version):
        shutil.rmtree(tree, ignore_errors=True)
        (tree / "tests").mkdir(parents=True)
        shutil.copytree(
            src / "tests" / "qemu-iotests", tree / "tests" / "qemu-iotests", symlinks=True
        )
        shutil.copytree(src / "python", tree / "python", symlinks=True)
        stamp.write_text(build.source_version)
    return layout


@dataclass(frozen=True)
class RunConfig:
    build: QemuBuild
    tools: SuiteTools
    layout: Layout
    stock: Path | None
    timeout: float = DEFAULT_TIMEOUT
    retries: int = 1  # a failed run is run again this many times (the machine is shared)
    unavailable: dict[Mode, str] | None = None  # mode -> why it cannot run
    testbed: Path | None = None  # the `testbed` whose broker the hook starts (default: ours)
    supervisor: Path | None = None  # the `testbed` whose supervise runs stock QEMU


def prepare_wrappers(cfg: RunConfig, modes: Sequence[Mode]) -> dict[Mode, Path]:
    return {
        m: write_wrapper(
            cfg.layout.bindir,
            m,
            qemu=cfg.build.system_emulator,
            stock=cfg.stock,
            supervisor=cfg.supervisor,
        ).path
        for m in modes
    }


def _read_jsonl(path: Path) -> list[dict[str, object]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a killed writer
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _names(x: object) -> tuple[str, ...]:
    return tuple(str(f) for f in x) if isinstance(x, list) else ()


def _num(x: object) -> float:
    return float(x) if isinstance(x, int | float) else 0.0


def _alive_broker(pid: int, audit: Path) -> bool:
    """Whether ``pid`` is still the broker of this run: alive, and its command
    line names this run's audit file.  Pids are reused within minutes on a
    busy machine, so the pid alone would name someone else's process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, IndexError):
        return False
    return state != "Z" and b"broker" in argv and os.fsencode(audit) in argv


def reap_brokers(launches: Sequence[dict[str, object]], audit: Path) -> int:
    """Count this run's brokers still alive after their test, and end them."""
    pids = [int(p) for p in (rec.get("broker_pid") for rec in launches) if isinstance(p, int)]
    deadline = time.monotonic() + BROKER_GRACE
    alive = [p for p in pids if _alive_broker(p, audit)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _alive_broker(p, audit)]
    for p in alive:
        if _alive_broker(p, audit):  # checked again right before the signal
            # SIGKILL: a broker still there after its QEMU is stuck (SIGTERM was
            # seen not to end one), and its audit records are already written
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    return len(alive)


_TAP = re.compile(r"^(not ok|ok) (\S+) (\S+)( # SKIP)?\s*$", re.M)


def parse_tap(out: str, fmt: str, test: str) -> Status | None:
    name = test.rsplit("/", 1)[-1]
    for m in _TAP.finditer(out):
        if m.group(2) == fmt and m.group(3) == name:
            if m.group(1) == "not ok":
                return Status.FAIL
            return Status.NOT_RUN if m.group(4) else Status.PASS
    return None


#: Set when the harness is interrupted: tests running in worker threads
#: (``--jobs``), which never see the KeyboardInterrupt, end their groups too.
_interrupted = threading.Event()


def _exited(pid: int, timeout: float) -> bool:
    """Wait for ``pid`` to exit *without reaping it*, so that its process group
    id cannot be reused by someone else's processes while we signal it."""
    deadline = time.monotonic() + timeout
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        if _interrupted.is_set():
            raise KeyboardInterrupt
        time.sleep(0.05)
    return True


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry))
    return out


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """End what is left of the test's process group (a QEMU it forgot, a daemon),
    then reap ``check``.  Only called while ``check`` is unreaped or alive."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if not _group_members(proc.pid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace
        while _group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    proc.wait()


@dataclass(frozen=True)
class _RunDirs:
    """Where one run keeps its files: ``rundir`` holds the others and the logs."""

    rundir: Path
    test_dir: Path
    tmp_dir: Path
    sock_dir: Path

    @classmethod
    def create(cls, rundir: Path) -> _RunDirs:
        shutil.rmtree(rundir, ignore_errors=True)
        test_dir = rundir / "scratch"
        test_dir.mkdir(parents=True)
        tmp_dir = rundir / "tmp"  # QEMU's -snapshot files go here, inside a grant
        tmp_dir.mkdir()
        # UNIX socket paths are limited to 107 bytes: SOCK_DIR stays short.
        sock_dir = Path(tempfile.mkdtemp(prefix="tbiot-", dir="/tmp"))
        return cls(rundir=rundir, test_dir=test_dir, tmp_dir=tmp_dir, sock_dir=sock_dir)


def _check_env(cfg: RunConfig, mode: Mode, wrapper: Path, dirs: _RunDirs) -> dict[str, str]:
    """``check``'s environment: ours, the suite's tools, the mode's wrapper and the dirs."""
    env = dict(os.environ)
    env.update(cfg.tools.env())
    env.update(wrapper_env(mode, qemu=cfg.build.system_emulator, testbed=cfg.testbed))
    env.update(
        QEMU_PROG=str(wrapper),
        TEST_DIR=str(dirs.test_dir),
        SOCK_DIR=str(dirs.sock_dir),
        TMPDIR=str(dirs.tmp_dir),
        TESTBED_IOTESTS_RUNDIR=str(dirs.rundir),
    )
    env.pop("PYTHONPATH", None)
    return env


@dataclass(frozen=True)
class _Checked:
    """How ``check`` ended, and what it printed."""

    timed_out: bool
    returncode: int
    seconds: float
    out: str
    err: str


def _run_check(
    cfg: RunConfig, fmt: str, test: str, env: dict[str, str], dirs: _RunDirs
) -> _Checked:
    """``check -tap -FMT TEST`` in its own process group, ended after ``cfg.timeout``."""
    argv = [sys.executable, "./check", "-tap", f"-{fmt}", test]
    rundir = dirs.rundir
    started = time.monotonic()
    timed_out = False
    with open(rundir / "check.out", "wb") as out, open(rundir / "check.err", "wb") as err:
        proc = subprocess.Popen(
            argv,
            cwd=cfg.layout.iotests,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # the test, its QEMUs and brokers: one group to kill
        )
        try:
            timed_out = not _exited(proc.pid, cfg.timeout)
        finally:  # interrupted too: the test's processes never outlive the harness
            _end_group(proc)
    seconds = round(time.monotonic() - started, 1)
    shutil.rmtree(dirs.sock_dir, ignore_errors=True)
    return _Checked(
        timed_out=timed_out,
        returncode=proc.returncode,
        seconds=seconds,
        out=(rundir / "check.out").read_text(errors="replace"),
        err=(rundir / "check.err").read_text(errors="replace"),
    )


def _verdict(
    cfg: RunConfig, mode: Mode, planned: Planned, checked: _Checked, test_dir: Path
) -> tuple[Status, str]:
    """The test's status from check's TAP line (or its absence), and why, if not a pass."""
    test, fmt = planned.test.name, planned.format
    status = parse_tap(checked.out, fmt, test)
    name = test.rsplit("/", 1)[-1]
    if checked.timed_out:
        return Status.FAIL, (
            f"timed out after {cfg.timeout:g}s running iotest {test} "
            f"({fmt}, {mode.value}, QEMU {cfg.build.version})"
        )
    if status is None:
        tail = (checked.err or checked.out).strip().splitlines()[-3:]
        return Status.FAIL, (
            f"check gave no result for {test} (exit {checked.returncode}): " + " | ".join(tail)
        )
    if status is Status.NOT_RUN:
        # 7.2 writes it in TEST_DIR, 10.0 in TEST_DIR/<fmt>-<proto>-<test>/
        notrun = next(iter(sorted(test_dir.rglob(f"{name}.notrun"))), None)
        return status, notrun.read_text(errors="replace").strip() if notrun else ""
    if status is Status.FAIL:
        why = "output mismatch" if checked.err.strip() else f"exit status {checked.returncode}"
        return status, why
    return status, ""


def _refusals(audit: Sequence[dict[str, object]]) -> tuple[Refusal, ...]:
    return tuple(
        Refusal(
            path=str(r.get("path", "")),
            flags=_names(r.get("flag_names")),
            result=int(_num(r.get("result"))),
            reason=str(r.get("reason", "")),
        )
        for r in audit
        if r.get("reason")
    )


def _first_answers(
    launches: Sequence[dict[str, object]], audit: Sequence[dict[str, object]]
) -> tuple[float, ...]:
    """Seconds from each QEMU's launch to the broker's first answer to it."""
    first: dict[int, float] = {}
    for r in audit:
        pid = r.get("peer_pid")
        if isinstance(pid, int) and pid not in first:
            first[pid] = _num(r.get("time"))
    return tuple(
        round(first[p] - _num(rec.get("time")), 4)
        for rec in launches
        if isinstance(p := rec.get("pid"), int) and p in first
    )


def run_one(cfg: RunConfig, mode: Mode, wrapper: Path | None, planned: Planned) -> TestRun:
    """One iotest in one mode, from its environment to its verdict.

    The steps' order is the point: environment, run, result, then the audit
    (the brokers are reaped last, after their records are read).
    """
    test, fmt = planned.test.name, planned.format
    base = TestRun(
        version=cfg.build.version,
        mode=mode.value,
        format=fmt,
        test=test,
        status=Status.NOT_RUN,
        seconds=0.0,
    )
    why = (cfg.unavailable or {}).get(mode)
    if why or wrapper is None:
        return dataclasses.replace(base, reason=why or "no wrapper")
    dirs = _RunDirs.create(cfg.layout.rundir(mode, fmt, test))
    checked = _run_check(cfg, fmt, test, _check_env(cfg, mode, wrapper, dirs), dirs)
    status, reason = _verdict(cfg, mode, planned, checked, dirs.test_dir)
    diff = tuple(checked.err.splitlines()) if status is Status.FAIL else ()
    launches = _read_jsonl(dirs.rundir / "launches.jsonl")
    audit = _read_jsonl(dirs.rundir / "audit.jsonl")
    return dataclasses.replace(
        base,
        status=status,
        seconds=checked.seconds,
        reason=reason,
        diff=diff,
        launches=len(launches),
        requests=len(audit),
        refusals=_refusals(audit),
        brokers_left=reap_brokers(launches, dirs.rundir / "audit.jsonl"),
        first_answer_s=_first_answers(launches, audit),
        latency_us=tuple(_num(r.get("latency_us")) for r in audit),
    )


def run_all(
    cfg: RunConfig,
    modes: Sequence[Mode],
    plan: Sequence[Planned],
    *,
    on_result: Callable[[TestRun, int, int], None] | None = None,
    jobs: int = 1,
) -> list[TestRun]:
    """Every planned test under every mode, the modes of one test back to back.

    Interleaving by test means a run cut short still holds comparable pairs.
    With ``jobs`` > 1 that many runs go at once (each has its own process
    group and directories); ``on_result`` sees them as they finish, and the
    list returned is in plan order either way.
    """
    wrappers = prepare_wrappers(cfg, [m for m in modes if m not in (cfg.unavailable or {})])
    work = [(planned, mode) for planned in plan for mode in modes]
    finished: list[TestRun] = []
    lock = threading.Lock()

    def one(planned: Planned, mode: Mode) -> TestRun:
        r = _run_with_retries(cfg, mode, wrappers.get(mode), planned)
        with lock:
            finished.append(r)
            if on_result is not None:
                on_result(r, len(finished), len(work))
        return r

    _interrupted.clear()  # an earlier run_all in this process may have been interrupted
    if jobs <= 1:
        return [one(planned, mode) for planned, mode in work]
    pool = concurrent.futures.ThreadPoolExecutor(jobs, thread_name_prefix="iotests")
    try:
        futures = [pool.submit(one, planned, mode) for planned, mode in work]
        return [f.result() for f in futures]
    except BaseException:
        _interrupted.set()  # the running tests end their process groups
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_with_retries(
    cfg: RunConfig, mode: Mode, wrapper: Path | None, planned: Planned
) -> TestRun:
    """One run, and again up to ``cfg.retries`` times while it fails (not by a known divergence)."""
    r = run_one(cfg, mode, wrapper, planned)
    failures: list[str] = []
    while (
        r.status is Status.FAIL
        and len(failures) < cfg.retries
        and explain(r.test, r.diff) is None  # a known divergence is not a race
    ):
        failures.append(r.reason + "".join(f"\n{line}" for line in r.diff[:40]))
        r = run_one(cfg, mode, wrapper, planned)
    if failures:
        r = dataclasses.replace(r, attempts=len(failures) + 1, earlier_failures=tuple(failures))
    return r


__all__ = [
    "DEFAULT_TIMEOUT",
    "Layout",
    "RunConfig",
    "lay_out",
    "parse_tap",
    "reap_brokers",
    "run_all",
    "run_one",
]
