"""What a server does per request, read from ``strace``: the Python floor's program.

The Python floor (:mod:`testbed.bench.pyfloor`) must issue the same system
calls per request as the broker does, or ``broker_cpu_vs_python_floor``
compares different work.  The broker changes (its gate may open through
``O_PATH`` and reopen through ``/proc/self/fd``), so the floor's program is
not written down by hand: it is *derived* from an strace of the broker
serving one client (:func:`trace_server`, :func:`per_request`), and the
floor can be traced the same way to check that it really issues what was
derived (``testbed bench --check-syscalls``, and
``tests/bench/test_bench_syscalls.py``).

A steady-state request of a server is the run of system calls from the wait
that precedes a request's ``recvmsg`` (``epoll_wait`` for the broker) up to
the next such wait.  Each call becomes a :class:`Step` whose descriptors are
named by *role*, so that fd numbers do not matter:

- ``sock``: the connection (what ``recvmsg`` reads);
- ``epoll``: the event-loop's descriptor (what ``epoll_wait`` waits on);
- ``root``: a directory descriptor the server held before the request
  (the grant's root, the first argument of ``openat2``);
- ``new0``, ``new1``, ...: descriptors opened during this request, in order.

Only the calls the floor knows how to issue are accepted; anything else is
a :class:`SyscallTraceError` naming the call, so a broker that starts
doing new work per request makes the derivation fail loudly rather than
the floor silently doing less.
"""

from __future__ import annotations

import collections
import enum
import fcntl
import itertools
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from testbed.errors import SyscallTraceError, WaitTimeout
from testbed.protocol import encode_request, format_flags

RESOLVE_NAMES = {
    "RESOLVE_NO_XDEV": 0x01,
    "RESOLVE_NO_MAGICLINKS": 0x02,
    "RESOLVE_NO_SYMLINKS": 0x04,
    "RESOLVE_BENEATH": 0x08,
    "RESOLVE_IN_ROOT": 0x10,
    "RESOLVE_CACHED": 0x20,
}
_MSG_NAMES = {
    n: int(getattr(socket, n))
    for n in ("MSG_CMSG_CLOEXEC", "MSG_DONTWAIT", "MSG_NOSIGNAL", "MSG_PEEK", "MSG_WAITALL")
}


def _names(value: int, table: dict[str, int]) -> str:
    """``A|B`` for the bits of ``value`` named in ``table``, the rest in hex; ``0`` for none."""
    words = [name for name, bit in table.items() if value & bit]
    rest = value & ~sum(bit for name, bit in table.items() if name in words)
    if rest:
        words.append(hex(rest))
    return "|".join(words) or "0"


#: Calls that wait for the next request: they open a request's segment.
WAITS = frozenset({"epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select"})


class Kind(enum.StrEnum):
    """The per-request system calls the Python floor knows how to issue."""

    WAIT = "epoll_wait"
    RECV = "recvmsg"
    OPENAT2 = "openat2"
    REOPEN = "openat"  # openat(AT_FDCWD, "/proc/self/fd/N", ...): a reopen of an O_PATH fd
    FSTAT = "fstat"
    FCNTL = "fcntl"
    SEND = "sendmsg"
    CLOSE = "close"


@dataclass(frozen=True, kw_only=True)
class Step:
    """One system call of a request; ``fd`` and ``target`` are roles, not numbers."""

    kind: Kind
    fd: str
    flags: int = 0  # open flags, msg flags, or fcntl's argument
    resolve: int = 0  # openat2's resolve bits
    command: int = 0  # fcntl's command
    target: str = ""  # REOPEN: whose /proc/self/fd entry; SEND: the fd passed ("" for none)

    def label(self) -> str:
        """A readable rendering: ``new0 = openat2(root, O_RDONLY|..., RESOLVE_BENEATH|...)``."""
        k = self.kind
        if k is Kind.OPENAT2:
            how = f"{format_flags(self.flags)}, {_names(self.resolve, RESOLVE_NAMES)}"
            return f"{self.fd} = openat2({self.target}, {how})"
        if k is Kind.REOPEN:
            return f"{self.fd} = openat(/proc/self/fd/{self.target}, {format_flags(self.flags)})"
        if k in (Kind.RECV, Kind.SEND):
            passed = f", [{self.target}]" if self.target else ""
            return f"{k.value}({self.fd}{passed}, {_names(self.flags, _MSG_NAMES)})"
        if k is Kind.FCNTL:
            command = "F_SETFL" if self.command == fcntl.F_SETFL else "F_GETFL"
            return f"fcntl({self.fd}, {command}, {format_flags(self.flags)})"
        return f"{k.value}({self.fd})"

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["kind"] = self.kind.value
        return d

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Step:
        try:
            return cls(
                kind=Kind(str(d["kind"])),
                fd=str(d["fd"]),
                flags=int(str(d.get("flags", 0))),
                resolve=int(str(d.get("resolve", 0))),
                command=int(str(d.get("command", 0))),
                target=str(d.get("target", "")),
            )
        except (KeyError, ValueError) as err:
            raise SyscallTraceError(f"bad step {d!r}: {err}") from err


Program = tuple[Step, ...]


@dataclass(frozen=True, kw_only=True)
class Call:
    """One parsed strace line."""

    pid: int
    name: str
    args: tuple[str, ...]
    result: int


_LINE = re.compile(r"^(?P<pid>\d+)\s+(?P<name>\w+)\((?P<args>.*)\)\s+=\s+(?P<ret>-?\d+|\?)")


def split_args(text: str) -> tuple[str, ...]:
    """Top-level comma split of an strace argument list (brackets and quotes nest)."""
    out, depth, quote, escape, start = [], 0, False, False, 0
    for i, ch in enumerate(text):
        if quote:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                quote = False
        elif ch == '"':
            quote = True
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return tuple(out)


def parse_strace(text: str) -> list[Call]:
    """Completed calls of an ``strace -f`` log (unfinished/resumed pairs are skipped)."""
    calls = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None or m["ret"] == "?":
            continue
        calls.append(
            Call(
                pid=int(m["pid"]),
                name=m["name"],
                args=split_args(m["args"]),
                result=int(m["ret"]),
            )
        )
    return calls


def symbols(text: str, *, what: str) -> int:
    """``O_RDONLY|O_CLOEXEC`` (or ``MSG_*``, ``RESOLVE_*``, a number) as an int."""
    value = 0
    for word in text.strip().split("|"):
        word = word.strip()
        if not word or word == "0":
            continue
        if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", word):
            value |= int(word, 0)
        elif word in RESOLVE_NAMES:
            value |= RESOLVE_NAMES[word]
        elif word.startswith("O_") and hasattr(os, word):
            value |= int(getattr(os, word))
        elif word.startswith("MSG_") and hasattr(socket, word):
            value |= int(getattr(socket, word))
        else:
            raise SyscallTraceError(f"unknown {what} name {word!r} in {text!r}")
    return value


def _field(struct_text: str, name: str) -> str:
    m = re.search(rf"\b{name}=([^,}}]+)", struct_text)
    if m is None:
        raise SyscallTraceError(f"no {name}= in {struct_text!r}")
    return m[1]


class _Roles:
    """Maps a segment's fd numbers to roles (sock, epoll, root, new0, ...)."""

    def __init__(self) -> None:
        self.by_fd: dict[int, str] = {}
        self.opened = 0

    def known(self, fd: int, *, default: str) -> str:
        return self.by_fd.setdefault(fd, default)

    def new(self, fd: int) -> str:
        role = f"new{self.opened}"
        self.opened += 1
        self.by_fd[fd] = role
        return role

    def existing(self, fd: int, call: Call) -> str:
        if fd not in self.by_fd:
            raise SyscallTraceError(
                f"{call.name}({', '.join(call.args)}) uses fd {fd}, which this request "
                "neither opened nor received on"
            )
        return self.by_fd[fd]


def to_step(call: Call, roles: _Roles) -> Step:
    """The :class:`Step` for one steady-state call, or SyscallTraceError.

    Long because it is one branch per system call the floor can issue, each
    reading that call's strace arguments; split up, the per-call parsing
    would be spread over as many functions that only this one calls.
    """
    if call.result < 0:
        raise SyscallTraceError(f"{call.name} failed ({call.result}) in the steady state")
    a = call.args
    try:
        if call.name in WAITS:
            return Step(kind=Kind.WAIT, fd=roles.known(int(a[0]), default="epoll"))
        if call.name == "recvmsg":
            return Step(
                kind=Kind.RECV, fd=roles.known(int(a[0]), default="sock"),
                flags=symbols(a[-1], what="MSG flag"),
            )  # fmt: skip
        if call.name == "openat2":
            how = a[2]
            dirfd = roles.known(int(a[0]), default="root")
            return Step(
                kind=Kind.OPENAT2,
                fd=roles.new(call.result),
                target=dirfd,
                flags=symbols(_field(how, "flags"), what="open flag"),
                resolve=symbols(_field(how, "resolve"), what="resolve flag")
                if "resolve=" in how
                else 0,
            )
        if call.name == "openat":
            # a reopen of an O_PATH fd: by its /proc/self/fd name, or by its
            # number relative to a dirfd of /proc/self/fd (what the broker does)
            m = re.fullmatch(r'"/proc/self/fd/(\d+)"', a[1])
            if a[0] != "AT_FDCWD":
                m = re.fullmatch(r'"(\d+)"', a[1])
            if m is None:
                raise SyscallTraceError(
                    f"openat({', '.join(a)}): the floor only reopens /proc/self/fd entries"
                )
            source = roles.existing(int(m[1]), call)
            return Step(
                kind=Kind.REOPEN, fd=roles.new(call.result), target=source,
                flags=symbols(a[2], what="open flag"),
            )  # fmt: skip
        if call.name == "fstat" or (call.name == "newfstatat" and a[1] == '""'):
            return Step(kind=Kind.FSTAT, fd=roles.existing(int(a[0]), call))
        if call.name == "fcntl":
            command = a[1]
            if command not in ("F_SETFL", "F_GETFL"):
                raise SyscallTraceError(f"fcntl {command}: the floor only knows F_SETFL/F_GETFL")
            return Step(
                kind=Kind.FCNTL,
                fd=roles.existing(int(a[0]), call),
                command=int(getattr(fcntl, command)),
                flags=symbols(a[2], what="open flag") if len(a) > 2 else 0,
            )
        if call.name == "sendmsg":
            m = re.search(r"cmsg_data=\[(\d+)\]", a[1])
            passed = roles.existing(int(m[1]), call) if m else ""
            return Step(
                kind=Kind.SEND, fd=roles.existing(int(a[0]), call), target=passed,
                flags=symbols(a[-1], what="MSG flag"),
            )  # fmt: skip
        if call.name == "close":
            return Step(kind=Kind.CLOSE, fd=roles.existing(int(a[0]), call))
    except (IndexError, ValueError) as err:
        raise SyscallTraceError(f"cannot read {call.name}({', '.join(a)}): {err}") from err
    raise SyscallTraceError(
        f"{call.name}({', '.join(a)}) per request: the Python floor has no step for "
        f"{call.name} (add one to testbed/bench/syscalls.py and pyfloor.py)"
    )


@dataclass(frozen=True, kw_only=True)
class Derived:
    """The steady-state program and how typical it was."""

    program: Program
    segments: int  # steady-state requests looked at
    matching: int  # how many of them had exactly this program

    @property
    def names(self) -> list[str]:
        return [s.kind.value for s in self.program]


def segments(calls: Sequence[Call]) -> list[list[Call]]:
    """Split one thread's calls into requests: each starts at the wait before a request."""
    starts = []
    for i, c in enumerate(calls):
        if c.name == "recvmsg" and c.result > 0:
            j = i
            while j > 0 and calls[j - 1].name in WAITS:
                j -= 1
            starts.append(j)
    return [list(calls[a:b]) for a, b in itertools.pairwise(starts)]


def per_request(calls: Sequence[Call], *, skip: int = 3) -> Derived:
    """The most common per-request program of the thread that served requests."""
    served = collections.Counter(c.pid for c in calls if c.name == "recvmsg" and c.result > 0)
    if not served:
        raise SyscallTraceError("no recvmsg that returned data: the server served nothing")
    pid = served.most_common(1)[0][0]
    mine = [c for c in calls if c.pid == pid]
    segs = segments(mine)[skip:]
    if not segs:
        raise SyscallTraceError(f"only {served[pid]} requests traced: need more than {skip + 1}")
    programs: collections.Counter[Program] = collections.Counter()
    # A request with a call the floor cannot issue (the broker's SIOCOUTQ
    # check on every 4th fd reply) is left out of the vote, and counts
    # against how typical the program is; if none is left, that is an error.
    first_error: SyscallTraceError | None = None
    for seg in segs:
        roles = _Roles()
        try:
            programs[tuple(to_step(c, roles) for c in seg)] += 1
        except SyscallTraceError as err:
            first_error = first_error or err
    if not programs:
        assert first_error is not None
        raise first_error
    program, count = programs.most_common(1)[0]
    return Derived(program=program, segments=len(segs), matching=count)


def trace_server(
    argv: Sequence[str], *, file: Path, requests: int = 40, timeout: float = 60.0
) -> list[Call]:
    """Run ``argv`` under ``strace -f`` and send it ``requests`` opens of ``file``.

    The server inherits one end of a socketpair (``{fd}`` in ``argv``) and
    must exit when the other end closes (``testbed broker --fd`` does): a
    signal would only make strace detach and leave the server running.
    """
    strace = shutil.which("strace")
    if strace is None:
        raise SyscallTraceError("strace is not installed (apt-get install strace)")
    from testbed.bench.client import one_op

    with tempfile.TemporaryDirectory(prefix="tbs.") as tmp:
        out = Path(tmp) / "trace"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        words = [w.replace("{fd}", str(theirs.fileno())) for w in argv]
        cmd = [strace, "-f", "-qq", "-o", str(out), *words]
        with ours:
            proc = subprocess.Popen(
                cmd, pass_fds=(theirs.fileno(),), stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            theirs.close()
            ours.settimeout(timeout)
            frame = encode_request(str(file), os.O_RDONLY, 0)
            try:
                for _ in range(requests):
                    one_op(ours, frame)
            except (OSError, Exception) as err:
                proc.kill()
                _, stderr = proc.communicate(timeout=timeout)
                raise SyscallTraceError(
                    f"{' '.join(words)} under strace: {err}; stderr: {stderr.decode()[-500:]}"
                ) from err
        try:
            proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            proc.communicate()
            raise WaitTimeout(
                f"{words[0]} under strace to exit after its peer left", timeout
            ) from exc
        return parse_strace(out.read_text(errors="replace"))


def compare(broker: Program, floor: Program) -> list[str]:
    """Differences between two programs, one line each (empty: they match)."""
    if broker == floor:
        return []
    lines = [f"broker: {', '.join(s.label() for s in broker)}"]
    lines.append(f"floor:  {', '.join(s.label() for s in floor)}")
    return lines
