"""Each correctness point of the supervisor, with the C helper as the supervised program."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from supervise_helpers import Run, parse

from testbed.broker import Policy
from testbed.pytest_plugin import missing
from testbed.supervise import Supervisor, supervised_popen
from testbed.supervise.decide import Decider


def test_served_open_reads_the_file_and_refuses_outside(
    run_supervised: Run, tmp_path: Path
) -> None:
    (tmp_path / "ok").write_text("granted")
    done, sup = run_supervised(
        "open", tmp_path / "ok", "0", policy=Policy.from_grants(ro=[tmp_path])
    )
    assert parse(done.stdout) == {"open": "ok", "content": "granted"}
    served = [r for r in sup.records if r.path == str(tmp_path / "ok")]
    assert len(served) == 1 and served[0].result == 0
    rec = served[0].json_line()
    assert '"via":"seccomp"' in rec and f'"tid":{done_pid(sup)}' in rec
    done, _ = run_supervised("open", "/etc/shadow", "0", policy=Policy.from_grants(ro=[tmp_path]))
    assert parse(done.stdout)["open"] == "EACCES"


def done_pid(sup: Supervisor) -> int:
    assert sup.process is not None
    return sup.process.pid


def test_relative_names_use_the_calling_threads_cwd_and_dirfd(
    run_supervised: Run, tmp_path: Path
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "name").write_text(d.name)
    # the helper opens directory a for its dirfd: the grant must allow directories
    policy = Policy.from_grants(ro=[tmp_path], directories=True)
    done, _ = run_supervised("relative", a, b, policy=policy)
    # the thread has its own cwd (unshare(CLONE_FS)); the main thread's is b
    assert parse(done.stdout) == {"thread": "a", "main": "b", "dirfd": "a"}


def test_proc_self_names_the_caller_not_the_supervisor(run_supervised: Run) -> None:
    done, _ = run_supervised("procself")
    got = parse(done.stdout)
    assert got["status_pid"] == got["pid"] != str(os.getpid())
    assert got["thread_stat"] == got["tid"]


def test_proc_of_another_process_is_refused(run_supervised: Run) -> None:
    # the supervisor opens as itself: its own /proc/PID must not be handed out
    done, _ = run_supervised("open", f"/proc/{os.getpid()}/status", "0")
    assert parse(done.stdout)["open"] == "EACCES"
    done, _ = run_supervised("open", "/proc/self/../1/status", "0")
    assert parse(done.stdout)["open"] == "EACCES"


def test_the_callers_umask_applies_to_created_files(run_supervised: Run, tmp_path: Path) -> None:
    policy = Policy.from_grants(create=[tmp_path])
    old = os.umask(0o022)
    try:
        done, _ = run_supervised("umask", "077", tmp_path / "private", "0664", policy=policy)
        assert parse(done.stdout) == {"open": "ok", "mode": "600"}
        # umask 0 must not pick up the supervisor's 022
        done, _ = run_supervised("umask", "0", tmp_path / "shared", "0664", policy=policy)
        assert parse(done.stdout) == {"open": "ok", "mode": "664"}
    finally:
        os.umask(old)


def test_o_cloexec_is_mirrored(run_supervised: Run, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    done, _ = run_supervised("cloexec", tmp_path / "f", policy=Policy.from_grants(ro=[tmp_path]))
    assert parse(done.stdout) == {"with": "1", "without": "0"}


@pytest.mark.slow
def test_signal_storm_does_not_turn_an_exclusive_create_into_eexist(
    run_supervised: Run, tmp_path: Path
) -> None:
    done, _ = run_supervised(
        "storm", tmp_path, "2000", policy=Policy.from_grants(create=[tmp_path])
    )
    assert parse(done.stdout) == {"eexist": "0", "other": "0"}


@pytest.mark.slow
def test_without_wait_killable_recv_the_storm_does_cause_eexist(
    run_supervised: Run, tmp_path: Path
) -> None:
    # The control for the test above: the storm really restarts served opens.
    done, _ = run_supervised(
        "storm", tmp_path, "2000", policy=Policy.from_grants(create=[tmp_path]), wait_killable=False
    )
    assert int(parse(done.stdout)["eexist"]) > 0


def test_i386_int80_is_killed(run_supervised: Run) -> None:
    done, _ = run_supervised("int80", "/etc/passwd")
    assert done.returncode == -signal.SIGSYS
    assert "survived" not in done.stdout


def test_x32_calls_are_killed(run_supervised: Run) -> None:
    done, _ = run_supervised("x32", "/etc/passwd")
    assert done.returncode == -signal.SIGSYS


def test_io_uring_setup_is_refused_with_enosys(run_supervised: Run) -> None:
    done, _ = run_supervised("iouring")
    assert parse(done.stdout) == {"io_uring_setup": "ENOSYS"}


def test_open_by_handle_at_is_refused(run_supervised: Run, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    done, _ = run_supervised("handle", tmp_path / "f", policy=Policy.from_grants(ro=[tmp_path]))
    assert parse(done.stdout) == {"open_by_handle_at": "EPERM"}


def test_many_threads_at_once_each_get_their_own_file(run_supervised: Run, tmp_path: Path) -> None:
    for i in range(16):
        (tmp_path / f"t{i}").write_text(f"t{i}")
    done, sup = run_supervised(
        "threads", tmp_path, "16", "50", policy=Policy.from_grants(ro=[tmp_path])
    )
    failed = [r for r in sup.records if r.result != 0]
    assert parse(done.stdout) == {"bad": "0"}, (done.stdout, failed)
    tids = {r.tid for r in sup.records if r.path.startswith(str(tmp_path))}  # type: ignore[attr-defined]
    assert len(tids) == 16


def test_a_reply_is_sent_when_injecting_fails(run_supervised: Run, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    done, sup = run_supervised("emfile", tmp_path / "f", policy=Policy.from_grants(ro=[tmp_path]))
    assert parse(done.stdout) == {"open": "EMFILE"}
    assert any("injecting the descriptor failed" in r.reason for r in sup.records)


def test_a_reply_is_sent_when_deciding_raises(
    run_supervised: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "f").write_text("x")
    real = Decider.decide

    def broken(self: Decider, path: str, *args: object, **kw: object) -> object:
        if path.startswith(str(tmp_path)):
            raise RuntimeError("a bug in the decision")
        return real(self, path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Decider, "decide", broken)
    done, _ = run_supervised("open", tmp_path / "f", "0", policy=Policy.from_grants(ro=[tmp_path]))
    assert parse(done.stdout) == {"open": "EIO"}


def _wait_gone(pid: int) -> None:
    # waitid(WNOWAIT): the child is dead (left the notification) but not reaped
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def test_notif_id_valid_is_checked_after_reading_the_caller(
    helper: Path, kernel: None, tmp_path: Path
) -> None:
    """A caller that dies after its memory and /proc were read is not acted on:
    its TID could be someone else's by then.  Here it asked to create a file."""
    victim = tmp_path / "victim"
    with Supervisor(Policy.from_grants(create=[tmp_path])) as sup:
        proc = sup.popen(
            [helper, "wait-open", "/dev/null", victim, str(os.O_CREAT | os.O_WRONLY)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert sup.server is not None

        killed: list[str] = []

        def kill_the_caller(notif: object, path: str) -> None:
            if path == str(victim):
                proc.kill()
                _wait_gone(proc.pid)
                killed.append(path)

        sup.server.after_reads = kill_the_caller
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == b"a=ok\n"
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        proc.wait(10)
        sup.wait(10)
    assert killed == [str(victim)]  # the caller died right after the reads
    assert not victim.exists()
    assert not [r for r in sup.records if r.path == str(victim)]


def test_supervisor_killed_later_opens_fail_enosys_and_open_files_keep_working(
    helper: Path, kernel: None, tmp_path: Path
) -> None:
    (tmp_path / "a").write_text("still readable")
    (tmp_path / "b").write_text("x")
    sup = subprocess.Popen(
        [sys.executable, "-m", "testbed", "supervise", "--allow-ro", str(tmp_path), "--",
         str(helper), "wait-open", str(tmp_path / "a"), str(tmp_path / "b")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert sup.stdout is not None and sup.stdin is not None
    assert sup.stdout.readline() == b"a=ok\n"
    sup.kill()
    sup.wait(10)
    sup.stdin.write(b"go\n")  # the helper holds the other end: it outlived the supervisor
    sup.stdin.flush()
    rest = parse(sup.stdout.read().decode())
    assert rest == {"b": "ENOSYS", "a_reads": "still readable"}


def test_a_hung_open_does_not_stall_other_threads(run_supervised: Run, tmp_path: Path) -> None:
    hung, fast = tmp_path / "hung", tmp_path / "fast"
    hung.write_text("h")
    fast.write_text("f")
    with Fanotify(hung) as fan:
        result: dict[str, object] = {}

        def run() -> None:
            result["done"] = run_supervised(
                "slow", hung, fast, "50", policy=Policy.from_grants(ro=[tmp_path])
            )

        t = threading.Thread(target=run)
        t.start()
        fan.wait_for_open(10)  # a worker is now stuck in the open of `hung`
        time.sleep(1.0)  # meanwhile the fast opens run
        fan.allow_all()
        t.join(30)
    done, _ = result["done"]  # type: ignore[misc]
    lines = done.stdout.splitlines()
    # the fast opens finished while the hung one was still waiting
    assert lines == ["fast_ok=50", "hung=ok"]


def test_a_fifo_in_a_grant_does_not_block_the_supervisor(
    run_supervised: Run, tmp_path: Path
) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "f").write_text("x")
    done, sup = run_supervised(
        "open", tmp_path / "fifo", "0", policy=Policy.from_grants(ro=[tmp_path])
    )
    # refused without being waited on (the gate opens O_NONBLOCK, then checks the type)
    assert parse(done.stdout) == {"open": "EACCES"}
    assert any("FIFO" in r.reason for r in sup.records)


def test_the_child_has_no_listener_and_gets_the_callers_fds(
    helper: Path, kernel: None, tmp_path: Path
) -> None:
    r, w = os.pipe()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "testbed", "supervise", "--", str(helper), "fds"],
            pass_fds=(w,),
            capture_output=True,
            text=True,
            timeout=30,
        )
        fds = parse(out.stdout)
        assert f"fd{w}" in fds and fds[f"fd{w}"].startswith("pipe:")
        assert not [v for v in fds.values() if "seccomp" in v]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "testbed",
                "supervise",
                "--",
                str(helper),
                "write",
                str(w),
                "hi",
            ],
            pass_fds=(w,),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert parse(out.stdout) == {"write": "ok"}
        assert os.read(r, 10) == b"hi"
    finally:
        os.close(r)
        os.close(w)


def test_exit_status_is_the_commands(kernel: None) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "testbed", "supervise", "--", "sh", "-c", "exit 7"], timeout=30
    )
    assert out.returncode == 7
    out = subprocess.run(
        [sys.executable, "-m", "testbed", "supervise", "--", "sh", "-c", "kill -TERM $$"],
        timeout=30,
    )
    assert out.returncode == 128 + signal.SIGTERM


# -- fanotify: a file whose open blocks until we say so -------------------------------------

FAN_CLOEXEC = 0x1
FAN_CLASS_CONTENT = 0x4
FAN_MARK_ADD = 0x1
FAN_OPEN_PERM = 0x10000
FAN_ALLOW = 0x1
AT_FDCWD = -100


class Fanotify:
    """Holds every open of one file (FAN_OPEN_PERM) until :meth:`allow_all`."""

    def __init__(self, path: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        fd = self.libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC, os.O_RDONLY)
        if fd < 0:
            missing(f"fanotify_init: {os.strerror(ctypes.get_errno())}")
        self.fd = fd
        ok = self.libc.fanotify_mark(
            fd, FAN_MARK_ADD, ctypes.c_uint64(FAN_OPEN_PERM), AT_FDCWD, str(path).encode()
        )
        if ok != 0:
            missing(f"fanotify_mark: {os.strerror(ctypes.get_errno())}")
        self.pending: list[int] = []

    def wait_for_open(self, timeout: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        assert ready, f"no open of the held file within {timeout}s"
        data = os.read(self.fd, 4096)
        off = 0
        while off < len(data):
            event_len = int.from_bytes(data[off : off + 4], sys.byteorder)
            efd = int.from_bytes(data[off + 16 : off + 20], sys.byteorder, signed=True)
            self.pending.append(efd)
            off += event_len

    def allow_all(self) -> None:
        for efd in self.pending:
            os.write(
                self.fd,
                efd.to_bytes(4, sys.byteorder, signed=True) + FAN_ALLOW.to_bytes(4, sys.byteorder),
            )
            os.close(efd)
        self.pending.clear()

    def __enter__(self) -> Fanotify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.allow_all()
        os.close(self.fd)


def test_policy_peer_uid_and_pid_apply_to_the_supervised_process(
    run_supervised: Run, tmp_path: Path
) -> None:
    (tmp_path / "f").write_text("x")
    mine = Policy.from_grants(ro=[tmp_path], peer_uid=os.getuid())
    done, _ = run_supervised("open", tmp_path / "f", "0", policy=mine)
    assert parse(done.stdout)["open"] == "ok"
    other = Policy.from_grants(ro=[tmp_path], peer_uid=os.getuid() + 4242)
    # not the peer: nothing is served, not even its libraries
    done, sup = run_supervised("open", tmp_path / "f", "0", policy=other)
    assert done.returncode != 0 and "open=" not in done.stdout
    assert sup.records and all("peer_uid" in r.reason for r in sup.records)
    nobody = Policy.from_grants(ro=[tmp_path], peer_pid=1)
    done, sup = run_supervised("open", tmp_path / "f", "0", policy=nobody)
    assert done.returncode != 0
    assert sup.records and all("peer_pid" in r.reason for r in sup.records)


def test_system_profile_file_replaces_the_builtin(
    helper: Path, kernel: None, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text('[profile]\ndescription = "nothing at all"\n')
    cmd = [sys.executable, "-m", "testbed", "supervise"]
    out = subprocess.run(
        [*cmd, "--system-profile", str(empty), "--", str(helper), "iouring"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    # the dynamic loader cannot even read libc now
    assert out.returncode == 127 and "error while loading shared libraries" in out.stderr
    out = subprocess.run(
        [*cmd, "--", str(helper), "iouring"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    out = subprocess.run(
        [*cmd, "--system-profile", "nonesuch", "--", "true"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "no such built-in system profile" in out.stderr


def test_edge_cases_get_the_kernels_answers(
    helper: Path, run_supervised: Run, tmp_path: Path
) -> None:
    (tmp_path / "f").write_text("x")
    args = (str(tmp_path), str(tmp_path / "f"), str(tmp_path / "nope"))
    native = parse(subprocess.run([helper, "edge", *args], capture_output=True, text=True).stdout)
    done, _ = run_supervised("edge", *args, policy=Policy.from_grants(create=[tmp_path]))
    served = parse(done.stdout)
    same = [
        "null", "badptr", "empty", "badfd", "notdir", "long", "missing",
        "trailing_slash", "openat2_plain", "openat2_badflags",
    ]  # fmt: skip
    assert {k: served[k] for k in same} == {k: native[k] for k in same}
    assert native["trailing_slash"] == "ENOTDIR" and native["openat2_plain"] == "ok"
    # what the supervisor cannot serve, said plainly
    assert served["opath"] == "EACCES"  # ADDFD cannot inject an O_PATH fd
    assert served["tmpfile"] == "EOPNOTSUPP"  # an unnamed file cannot be audited by name
    assert served["openat2_resolve"] == "ENOSYS"  # RESOLVE_* is not honoured: fall back


def test_a_later_command_does_not_inherit_an_earlier_ones_listener(
    helper: Path, kernel: None
) -> None:
    first = Supervisor()
    second = Supervisor()
    try:
        sleeper = first.popen(["sleep", "30"], close_fds=False)
        proc = second.popen([helper, "fds"], stdout=subprocess.PIPE, close_fds=False)
        out, _ = proc.communicate(timeout=30)
        assert not [v for v in parse(out.decode()).values() if "seccomp" in v]
        sleeper.kill()
        sleeper.wait()
    finally:
        first.close()
        second.close()


def test_supervised_popen_runs_and_serves(helper: Path, kernel: None, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("via supervised_popen")
    proc, sup = supervised_popen(
        [helper, "open", tmp_path / "f", "0"],
        Policy.from_grants(ro=[tmp_path]),
        stdout=subprocess.PIPE,
    )
    try:
        out, _ = proc.communicate(timeout=30)
        assert parse(out.decode())["content"] == "via supervised_popen"
        assert sup.wait(10) == 0
    finally:
        sup.close()


def test_path_tricks_stay_inside_grants_and_profile(run_supervised: Run, tmp_path: Path) -> None:
    grant = tmp_path / "grant"
    grant.mkdir()
    (tmp_path / "outside").write_text("secret")
    (grant / "link").symlink_to(tmp_path / "outside")
    (grant / "rel").symlink_to("../outside")
    policy = Policy.from_grants(ro=[grant])
    for path in (
        f"{grant}/../outside",  # out of the grant by ..
        f"{grant}/link",  # by an absolute symlink
        f"{grant}/rel",  # by a relative one
        "/usr/lib/../../etc/shadow",  # out of the system profile by ..
        "/proc/self/root/etc/shadow",  # through a magic link
        "/dev/fd/0",  # the supervisor's own fd 0, if followed
    ):
        done, _ = run_supervised("open", path, "0", policy=policy)
        assert parse(done.stdout)["open"] == "EACCES", path


def test_the_supervisors_copy_is_closed_before_the_caller_resumes(
    run_supervised: Run, tmp_path: Path
) -> None:
    # A copy of the fd left open in the supervisor keeps the open file
    # description, and the OFD locks taken on it, alive after the caller's
    # close: QEMU's image locking then conflicts with itself.
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"x" * 4096)
    done, _ = run_supervised("ofdlock", disk, "300", policy=Policy.from_grants(rw=[tmp_path]))
    assert parse(done.stdout) == {"conflicts": "0"}
