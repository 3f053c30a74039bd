"""The normaliser: strace text and audit records in, comparable opens out."""

from __future__ import annotations

import os

import pytest

from testbed.broker import AuditRecord
from testbed.compare.normalise import (
    RawOpen,
    StraceParseError,
    from_audit,
    normalise,
    parse_strace,
)
from testbed.compare.trace import Open

ROOT = "/srv/scen"

STRACE = """\
4711  openat(AT_FDCWD, "/usr/share/seabios/bios.bin", O_RDONLY|O_CLOEXEC) = 3
4711  openat(AT_FDCWD, "/srv/scen/top.qcow2", O_RDONLY|O_NONBLOCK|O_CLOEXEC) = 3
4711  openat(AT_FDCWD, "/srv/scen/top.qcow2", O_RDONLY|O_CLOEXEC) = 3
4712  openat(AT_FDCWD, "/srv/scen/new.qcow2", O_RDWR|O_CREAT|O_CLOEXEC, 0644 <unfinished ...>
4711  openat(AT_FDCWD, "/srv/scen/gone", O_RDONLY|O_NONBLOCK|O_CLOEXEC) = -1 ENOENT (No such file)
4712  <... openat resumed>) = 9
4711  openat(AT_FDCWD, "/dev/sgx_vepc", O_RDWR|O_CLOEXEC) = -1 ENOENT (No such file or directory)
4711  openat(AT_FDCWD, "/srv/scen/tree", O_RDONLY|O_NONBLOCK|O_CLOEXEC|O_DIRECTORY) = 4
4711  openat(AT_FDCWD, "/srv/scen/with \\"quote\\"", O_RDWR|O_DIRECT|O_CLOEXEC) = 5
4711  open("/srv/scen/sub/../x\\303\\251", O_RDONLY) = 6
4711  openat(5, "relative", O_RDONLY) = 7
"""


def test_strace_to_trace() -> None:
    trace = normalise(parse_strace(STRACE), ROOT)
    assert [o.line() for o in trace] == [
        "probe top.qcow2 O_RDONLY|O_NONBLOCK -> ok",
        "open top.qcow2 O_RDONLY -> ok",
        # kept where it started, not where it resumed
        "open new.qcow2 O_RDWR|O_CREAT 0o644 -> ok",
        "probe gone O_RDONLY|O_NONBLOCK -> ENOENT",
        "open tree O_RDONLY|O_NONBLOCK|O_DIRECTORY -> ok",
        'open with "quote" O_RDWR|O_DIRECT -> ok',
        "open xé O_RDONLY -> ok",
    ]
    # openat(5, "relative"): relative to a directory fd we cannot name, dropped


def test_audit_records_give_the_same_trace_as_strace() -> None:
    def rec(path: str, flags: int, mode: int = 0, result: int = 0) -> AuditRecord:
        return AuditRecord(
            time=0.0,
            conn=1,
            peer_pid=1,
            path=path,
            flags=flags,
            flag_names=(),
            mode=mode,
            result=result,
            latency_us=1.0,
        )

    cloexec = os.O_CLOEXEC
    records = [
        rec("/dev/sgx_vepc", os.O_RDWR | cloexec, result=-13),
        rec(f"{ROOT}/top.qcow2", os.O_RDONLY | os.O_NONBLOCK | cloexec),
        rec(f"{ROOT}/top.qcow2", os.O_RDONLY | cloexec),
        rec(f"{ROOT}/new.qcow2", os.O_RDWR | os.O_CREAT | cloexec, 0o644),
        rec(f"{ROOT}/gone", os.O_RDONLY | os.O_NONBLOCK | cloexec, result=-2),
    ]
    assert normalise(from_audit(records), ROOT) == normalise(parse_strace(STRACE), ROOT)[:4]


def test_mode_only_for_creating_opens_and_largefile_dropped() -> None:
    (o,) = normalise([RawOpen(path=f"{ROOT}/a", flags=os.O_RDWR | 0o100000, mode=0o600)], ROOT)
    assert o == Open(path="a", flags=("O_RDWR",), mode=None, result="ok", probe=False)


def test_paths_outside_are_dropped_and_cwd_relative_ones_marked() -> None:
    raws = [
        RawOpen(path="/srv/scenario2/a", flags=0),
        RawOpen(path="b", flags=0),
        RawOpen(path="c", flags=0, dirfd="5"),
        RawOpen(path=".", flags=0),
        RawOpen(path=f"fat:16:{ROOT}/tree", flags=0),
    ]
    assert [o.path for o in normalise(raws, ROOT)] == ["cwd:b", "cwd:fat:16:$D/tree"]
    assert [o.path for o in normalise(raws[:3], ROOT, cwd=ROOT)] == ["b"]


def test_names_the_hook_joined_to_qemus_cwd_are_spelled_like_relative_ones() -> None:
    # stock QEMU's strace shows the relative name; the hook sends it joined to the cwd
    cwd = "/home/u/testbed"
    stock = [RawOpen(path=f"fat:16:{ROOT}/tree", flags=0), RawOpen(path="data.raw", flags=0)]
    hooked = [RawOpen(path=f"{cwd}/{r.path}", flags=0) for r in stock]
    assert [o.path for o in normalise(hooked, ROOT, qemu_cwd=cwd)] == [
        "cwd:fat:16:$D/tree",
        "cwd:data.raw",
    ]
    assert normalise(hooked, ROOT, qemu_cwd=cwd) == normalise(stock, ROOT)
    # beneath the scenario wins; elsewhere, and without qemu_cwd, it is not an image open
    inside = [RawOpen(path=f"{ROOT}/a", flags=0), RawOpen(path="/srv/other/b", flags=0)]
    assert [o.path for o in normalise(inside, ROOT, qemu_cwd=ROOT)] == ["a"]
    assert normalise(hooked, ROOT) == []
    # "/" as the cwd would claim every absolute path: it is not guessed
    assert normalise([RawOpen(path="/usr/share/x", flags=0)], ROOT, qemu_cwd="/") == []


def test_symlinked_root_matches_both_spellings(tmp_path: os.PathLike[str]) -> None:
    real = os.path.join(tmp_path, "real")
    os.mkdir(real)
    link = os.path.join(tmp_path, "link")
    os.symlink(real, link)
    raws = [RawOpen(path=f"{real}/x", flags=0), RawOpen(path=f"{link}/y", flags=0)]
    assert [o.path for o in normalise(raws, link)] == ["x", "y"]


def test_truncated_strace_path_is_an_error_not_a_silent_drop() -> None:
    with pytest.raises(StraceParseError, match="line 1: path truncated"):
        parse_strace('1 openat(AT_FDCWD, "/srv/sce"..., O_RDONLY) = 3\n')


def test_unknown_flag_names_the_line() -> None:
    with pytest.raises(StraceParseError, match="line 2: unknown open flag 'O_BOGUS'"):
        parse_strace(
            '1 openat(AT_FDCWD, "/a", O_RDONLY) = 3\n'
            '1 openat(AT_FDCWD, "/a", O_RDONLY|O_BOGUS) = 3\n'
        )


def test_unfinished_call_killed_without_result_is_a_failure() -> None:
    raws = parse_strace(
        '7 openat(AT_FDCWD, "/srv/scen/a", O_RDONLY <unfinished ...>\n7 <... openat resumed>) = ?\n'
    )
    assert normalise(raws, ROOT)[0].result == "EINTR"


def test_open_rejects_a_bad_result() -> None:
    with pytest.raises(ValueError, match="neither 'ok' nor an errno"):
        Open(path="a", flags=("O_RDONLY",), result="3")
