"""Deriving the Python floor's program from strace, and the floor issuing it.

The last tests trace the real broker and the real floor (they need
strace): this is the check to rerun whenever the broker's hot path changes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from testbed.bench.env import Env
from testbed.bench.runner import derive_floor, make_file
from testbed.bench.servers import floor_argv
from testbed.bench.syscalls import (
    Kind,
    Step,
    compare,
    parse_strace,
    per_request,
    split_args,
    trace_server,
)
from testbed.errors import SyscallTraceError
from testbed.pytest_plugin import require

TODAY = """\
7 epoll_wait(4, [{events=EPOLLIN, data={u32=7, u64=1}}], 1023, -1) = 1
7 recvmsg(7, {msg_name=0x7f, msg_iov=[{iov_base="x,y", iov_len=4096}], msg_iovlen=1, msg_flags=MSG_CMSG_CLOEXEC}, MSG_CMSG_CLOEXEC) = 32
7 openat2(8, "f.img", {flags=O_RDONLY|O_NOCTTY|O_NONBLOCK|O_CLOEXEC, resolve=RESOLVE_NO_MAGICLINKS|RESOLVE_NO_SYMLINKS|RESOLVE_BENEATH}, 24) = 9
7 newfstatat(9, "", {st_mode=S_IFREG|0644, st_size=65536, ...}, AT_EMPTY_PATH) = 0
7 fcntl(9, F_SETFL, O_RDONLY)       = 0
7 sendmsg(7, {msg_name=NULL, msg_iov=[{iov_base="\\f\\0", iov_len=12}], msg_control=[{cmsg_len=20, cmsg_level=SOL_SOCKET, cmsg_type=SCM_RIGHTS, cmsg_data=[9]}], msg_controllen=24, msg_flags=0}, MSG_DONTWAIT|MSG_NOSIGNAL) = 12
7 close(9)                          = 0
"""  # noqa: E501 - strace lines as strace prints them

#: What the hardened broker (O_PATH beneath the grant, fstat, reopen) will do.
HARDENED = """\
7 epoll_wait(4, [{events=EPOLLIN, data={u32=7, u64=1}}], 1023, -1) = 1
7 recvmsg(7, {msg_name=0x7f, msg_iov=[{iov_base="x", iov_len=4096}], msg_iovlen=1}, MSG_CMSG_CLOEXEC) = 32
7 openat2(8, "f.img", {flags=O_PATH|O_CLOEXEC, resolve=RESOLVE_NO_MAGICLINKS|RESOLVE_BENEATH}, 24) = 9
7 newfstatat(9, "", {st_mode=S_IFREG|0644, ...}, AT_EMPTY_PATH) = 0
7 openat(AT_FDCWD, "/proc/self/fd/9", O_RDONLY|O_CLOEXEC) = 10
7 close(9)                          = 0
7 newfstatat(10, "", {st_mode=S_IFREG|0644, ...}, AT_EMPTY_PATH) = 0
7 sendmsg(7, {msg_name=NULL, msg_control=[{cmsg_len=20, cmsg_level=SOL_SOCKET, cmsg_type=SCM_RIGHTS, cmsg_data=[10]}], msg_flags=0}, MSG_DONTWAIT|MSG_NOSIGNAL) = 12
7 close(10)                         = 0
"""  # noqa: E501 - strace lines as strace prints them


def trace_of(request: str, n: int = 8) -> str:
    """``n`` requests, the pid's other thread noise and an EOF at the end."""
    other = "9 futex(0x1, FUTEX_WAIT, 0, NULL) = 0\n"
    tail = "7 epoll_wait(4, [], 1023, -1) = 1\n7 recvmsg(7, {msg_iov=[]}, MSG_CMSG_CLOEXEC) = 0\n"
    return other + request * n + tail


def test_split_args_respects_brackets_and_quotes() -> None:
    assert split_args('7, {a=1, b=[2, 3]}, "x, y", 0') == ("7", "{a=1, b=[2, 3]}", '"x, y"', "0")


def test_todays_broker_becomes_its_seven_steps_with_roles() -> None:
    d = per_request(parse_strace(trace_of(TODAY)))
    assert d.names == ["epoll_wait", "recvmsg", "openat2", "fstat", "fcntl", "sendmsg", "close"]
    assert d.matching == d.segments == 4  # 8 requests, 3 skipped, the last has no end
    open2 = d.program[2]
    assert (open2.fd, open2.target) == ("new0", "root")
    assert open2.flags == os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
    assert open2.resolve == 0x02 | 0x04 | 0x08
    send = d.program[5]
    assert (send.fd, send.target) == ("sock", "new0")


def test_the_hardened_broker_reopen_is_derived_too() -> None:
    d = per_request(parse_strace(trace_of(HARDENED)))
    kinds = [s.kind for s in d.program]
    assert kinds == [Kind.WAIT, Kind.RECV, Kind.OPENAT2, Kind.FSTAT, Kind.REOPEN, Kind.CLOSE,
                     Kind.FSTAT, Kind.SEND, Kind.CLOSE]  # fmt: skip
    reopen = d.program[4]
    assert (reopen.fd, reopen.target, reopen.flags) == ("new1", "new0", os.O_CLOEXEC)
    assert d.program[7].target == "new1"  # the reopened fd is what travels
    assert reopen.label() == "new1 = openat(/proc/self/fd/new0, O_RDONLY|O_CLOEXEC)"
    assert d.program[7].label() == "sendmsg(sock, [new1], MSG_DONTWAIT|MSG_NOSIGNAL)"


def test_a_call_the_floor_cannot_issue_is_an_error_naming_it() -> None:
    extra = TODAY.replace("7 close(9)", '7 readlink("/proc/self/fd/9", "/x", 4095) = 2\n7 close(9)')
    with pytest.raises(SyscallTraceError, match=r"readlink.*no step for readlink"):
        per_request(parse_strace(trace_of(extra)))


def test_a_failing_call_in_the_steady_state_is_an_error() -> None:
    failing = TODAY.replace("24) = 9", "24) = -1 EXDEV (Invalid cross-device link)")
    with pytest.raises(SyscallTraceError, match="openat2 failed"):
        per_request(parse_strace(trace_of(failing)))


def test_a_server_that_served_nothing_is_an_error() -> None:
    with pytest.raises(SyscallTraceError, match="served nothing"):
        per_request(parse_strace("7 epoll_wait(4, [], 1023, -1) = 0\n"))


def test_programs_round_trip_through_json() -> None:
    d = per_request(parse_strace(trace_of(HARDENED)))
    back = tuple(Step.from_json(json.loads(json.dumps(s.to_json()))) for s in d.program)
    assert back == d.program
    assert compare(d.program, back) == []
    assert compare(d.program, back[:-1])  # a missing close is a difference


# -- against the real broker and the real floor (strace) --------------------


@pytest.fixture
def file(tmp_path: Path) -> Path:
    require(shutil.which("strace") is not None, "strace")
    return make_file(tmp_path / "files")


def floor_trace(program: tuple[Step, ...], file: Path) -> tuple[Step, ...]:
    env = Env(work_dir=file.parent, file=file, warmup=0, qemu_version="7.2",
              floor_program=program)  # fmt: skip
    return per_request(trace_server(floor_argv(env), file=file)).program


def test_the_floor_issues_the_brokers_system_calls(file: Path) -> None:
    broker = derive_floor(file)
    # a steady state: every request alike but for the broker's SIOCOUTQ check
    # of unread replies, made on every 4th fd reply (which the floor leaves out)
    assert broker.matching >= broker.segments * 3 // 4
    assert compare(broker.program, floor_trace(broker.program, file)) == []


def test_the_floor_can_issue_the_hardened_brokers_sequence(file: Path) -> None:
    program = per_request(parse_strace(trace_of(HARDENED))).program
    assert compare(program, floor_trace(program, file)) == []


def test_a_server_that_does_not_answer_fails_the_trace(file: Path) -> None:
    with pytest.raises(SyscallTraceError, match="under strace"):
        trace_server([sys.executable, "-c", "pass"], file=file, requests=2, timeout=10)
