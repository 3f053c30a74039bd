"""The ``<emulator>`` wrapper's decisions, without libvirt or QEMU."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.libvirt import emulator
from testbed.libvirt.emulator import (
    READY,
    SUPERVISE,
    EmulatorRefusal,
    Mode,
    domain_name,
    plan,
    run,
    socket_path,
)
from testbed.supervise import landlock, seccomp

PROBE = ["-S", "-no-user-config", "-nodefaults", "-nographic", "-machine", "none,accel=tcg"]
DOMAIN = ["-name", "guest=vm1,debug-threads=on", "-S", "-machine", "pc-i440fx-7.2"]


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (PROBE, None),
        (DOMAIN, "vm1"),
        (["-name", "vm2"], "vm2"),
        (["-name", "debug-threads=on,guest=vm3"], "vm3"),
        (["-name", "guest=a,,b,debug-threads=on"], "a,b"),
        (["--name", "guest=vm4"], "vm4"),
    ],
)
def test_domain_name(args: list[str], name: str | None) -> None:
    assert domain_name(args) == name


@pytest.mark.parametrize("args", [["-name"], ["-name", "debug-threads=on"]])
def test_a_name_without_a_guest_is_refused(args: list[str]) -> None:
    with pytest.raises(EmulatorRefusal):
        domain_name(args)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../../etc/x", "a\0b"])
def test_names_that_leave_the_run_dir_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(EmulatorRefusal):
        socket_path(name, tmp_path)


def test_a_probe_passes_through_untouched(tmp_path: Path) -> None:
    chosen = plan(["/opt/x/qemu-7.2-hook", *PROBE], qemu="/q", mode=Mode.HOOK, run_dir=tmp_path)
    assert chosen.binary == "/q"
    assert chosen.argv == ("/opt/x/qemu-7.2-hook", *PROBE)
    assert chosen.domain is None


def test_a_domain_keeps_argv0_and_gets_the_hook(tmp_path: Path) -> None:
    chosen = plan(
        ["/opt/x/qemu-7.2-hook", *DOMAIN],
        qemu="/q",
        mode=Mode.HOOK,
        run_dir=tmp_path,
        connect=False,
    )
    assert chosen.argv[0] == "/opt/x/qemu-7.2-hook"
    assert chosen.argv[1 : 1 + len(DOMAIN)] == tuple(DOMAIN)
    assert chosen.argv[-2] == "-open-hook-fd"
    assert "/usr/share/seabios" in chosen.argv


def test_no_broker_socket_refuses_and_says_how_to_start_one(tmp_path: Path) -> None:
    with pytest.raises(EmulatorRefusal, match=r"testbed libvirt serve vm1"):
        plan(["w", *DOMAIN], qemu="/q", mode=Mode.HOOK, run_dir=tmp_path)


def test_supervise_mode_execs_stock_qemu_without_a_hook(tmp_path: Path) -> None:
    chosen = plan(
        ["/opt/x/qemu-7.2-supervise", *DOMAIN],
        qemu="/usr/bin/qemu-system-x86_64",
        mode=Mode.SUPERVISE,
        run_dir=tmp_path,
        connect=False,
    )
    assert chosen.binary == "/usr/bin/qemu-system-x86_64"
    assert chosen.argv[0] == "/opt/x/qemu-7.2-supervise"
    assert chosen.argv[1 : 1 + len(DOMAIN)] == tuple(DOMAIN)
    assert "-open-hook-fd" not in chosen.argv
    assert "/usr/share/seabios" in chosen.argv
    assert chosen.pass_fd is None


def test_no_supervisor_socket_refuses_and_says_how_to_start_one(tmp_path: Path) -> None:
    with pytest.raises(EmulatorRefusal) as err:
        plan(["w", *DOMAIN], qemu="/q", mode=Mode.SUPERVISE, run_dir=tmp_path)
    assert "no supervisor socket" in str(err.value)
    assert "`testbed libvirt serve vm1 --supervise`" in str(err.value)


def test_the_wrappers_constants_are_the_supervisors() -> None:
    # emulator.py may import only the standard library, so it repeats these
    assert emulator.SYS_SECCOMP == seccomp.SYS_SECCOMP
    assert emulator.SYS_LANDLOCK_RESTRICT_SELF == landlock.SYS_LANDLOCK_RESTRICT_SELF
    assert emulator.SECCOMP_SET_MODE_FILTER == seccomp.SECCOMP_SET_MODE_FILTER
    assert emulator.SECCOMP_FILTER_FLAG_NEW_LISTENER == seccomp.SECCOMP_FILTER_FLAG_NEW_LISTENER
    assert (
        emulator.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
        == seccomp.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    )
    assert emulator.PR_SET_NO_NEW_PRIVS == seccomp.PR_SET_NO_NEW_PRIVS


def test_the_wrapper_imports_only_the_standard_library() -> None:
    source = Path(emulator.__file__).read_text()
    imported = {
        line.split()[1].split(".")[0]
        for line in source.splitlines()
        if line.startswith(("import ", "from "))
    }
    assert imported <= {"__future__", "ctypes", "os", "socket", "struct", "sys", "collections",
                        "dataclasses", "enum", "pathlib"}  # fmt: skip


def test_a_command_line_with_its_own_hook_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EmulatorRefusal, match="already"):
        plan(
            ["w", *DOMAIN, "-open-hook-fd", "9"],
            qemu="/q",
            mode=Mode.HOOK,
            run_dir=tmp_path,
            connect=False,
        )


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "vm1.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    yield sock, path
    sock.close()


def _answer(listener: socket.socket, reply: bytes | None) -> threading.Thread:
    def run() -> None:
        conn, _ = listener.accept()
        if reply:
            conn.sendall(reply)
        conn.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_the_fd_passed_to_qemu_is_the_connected_inheritable_socket(
    listener: tuple[socket.socket, Path], tmp_path: Path
) -> None:
    sock, _ = listener
    t = _answer(sock, READY)
    chosen = plan(["w", *DOMAIN], qemu="/q", mode=Mode.HOOK, run_dir=tmp_path)
    t.join(5)
    try:
        assert chosen.pass_fd is not None
        assert chosen.argv[-1] == str(chosen.pass_fd)
        assert os.get_inheritable(chosen.pass_fd)
        peer = socket.socket(fileno=os.dup(chosen.pass_fd))
        assert peer.family == socket.AF_UNIX
        peer.close()
    finally:
        if chosen.pass_fd is not None:
            os.close(chosen.pass_fd)


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("reply", [None, b"-"])
def test_a_server_that_does_not_say_go_ahead_is_a_refusal(
    listener: tuple[socket.socket, Path], tmp_path: Path, reply: bytes | None, mode: Mode
) -> None:
    sock, _ = listener
    t = _answer(sock, reply)
    with pytest.raises(EmulatorRefusal, match="refused"):
        plan(["w", *DOMAIN], qemu="/q", mode=mode, run_dir=tmp_path)
    t.join(5)


@pytest.mark.parametrize(
    ("mode", "reply", "said"),
    [
        (Mode.HOOK, SUPERVISE, "served by a supervisor (serve --supervise), but this wrapper "
         "is mode 'hook': start `testbed libvirt serve vm1` instead"),
        (Mode.SUPERVISE, READY, "served by a hook broker, but this wrapper is mode "
         "'supervise': start `testbed libvirt serve vm1 --supervise` instead"),
    ],
)  # fmt: skip
def test_a_server_of_the_other_mode_is_named(
    listener: tuple[socket.socket, Path], tmp_path: Path, mode: Mode, reply: bytes, said: str
) -> None:
    sock, _ = listener
    t = _answer(sock, reply)
    with pytest.raises(EmulatorRefusal) as err:
        plan(["w", *DOMAIN], qemu="/q", mode=mode, run_dir=tmp_path)
    t.join(5)
    assert said in str(err.value)


def test_a_supervisor_that_refuses_is_quoted(
    listener: tuple[socket.socket, Path], tmp_path: Path
) -> None:
    sock, _ = listener

    def serve() -> None:
        conn, _ = sock.accept()
        conn.sendall(SUPERVISE)
        conn.recv(4096)  # the binary's path
        conn.sendall(emulator.REFUSED + b"no such binary /q")
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    chosen = plan(["w", *DOMAIN], qemu="/q", mode=Mode.SUPERVISE, run_dir=tmp_path)
    assert chosen.supervisor_fd is not None
    with pytest.raises(EmulatorRefusal, match="the supervisor refused: no such binary /q"):
        emulator.confine(chosen.supervisor_fd, chosen.binary)
    t.join(5)


def test_run_names_an_unknown_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["w", *PROBE], qemu="/q", mode="turbo") == 1
    assert "unknown mode 'turbo'" in capsys.readouterr().err


def test_run_reports_a_refusal_instead_of_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["w", *DOMAIN], qemu="/q", mode="hook", run_dir=tmp_path) == 1
    assert capsys.readouterr().err.startswith("testbed-emulator: no broker socket")
