"""From raw opens (broker audit records, strace lines) to comparable traces.

The named filters, applied to every source alike:

* paths are made relative to the scenario directory; an open outside it
  (firmware, libraries, ``/dev/sgx_vepc``, temporary files) is not an image
  open and is dropped; a name QEMU gave relative to its working directory
  is kept as ``cwd:NAME`` (QEMU 7.2 opens a qcow2 external data file that
  way, and probes a whole ``fat:...`` name), the scenario directory inside
  it written ``$D``; the working directory itself (``.``) is dropped.  The
  hook sends such a name joined to QEMU's working directory (the series
  does, and so does the model), so an absolute name beneath ``qemu_cwd``
  and not beneath the scenario is spelled the same ``cwd:NAME``;
* flags lose ``O_CLOEXEC`` and ``O_LARGEFILE`` (QEMU adds the first itself,
  the broker ignores it; the second is 0 on x86_64 but strace may print it)
  and become symbolic names;
* the mode is kept only when the open may create a file;
* the result is ``ok`` or the errno's name (the broker says ``-2``, strace
  ``-1 ENOENT``);
* an ``O_RDONLY|O_NONBLOCK`` open of something other than a directory is
  QEMU's host_cdrom probe and marked as a probe;
* the random part of a temporary file name (``create_tmp_file``'s
  ``vl.XXXXXX``, behind ``-snapshot``) is written ``XXXXXX``.
"""

from __future__ import annotations

import errno as errno_mod
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from testbed.broker import AuditRecord
from testbed.compare.trace import Open
from testbed.errors import StraceParseError as StraceParseError  # re-exported
from testbed.protocol.flags import NOISE_FLAGS, flag_names, parse_flags, wants_create

#: Marks a path QEMU gave relative to its working directory (not the scenario's).
CWD_PREFIX = "cwd:"
#: Stands for the scenario directory inside a relative name.
ROOT_MARK = "$D"
#: ``create_tmp_file``'s ``$TMPDIR/vl.XXXXXX`` once g_mkstemp filled it in.
_TEMP_NAME = re.compile(r"(^|/)vl\.[A-Za-z0-9]{6}$")


@dataclass(frozen=True, kw_only=True)
class RawOpen:
    """An open as a source saw it: path as given, integer flags, fd or -errno."""

    path: str
    flags: int
    mode: int = 0
    result: int = 0
    #: ``AT_FDCWD`` or the directory descriptor of an ``openat``.
    dirfd: str = "AT_FDCWD"


def errno_name(result: int) -> str:
    """``ok`` for a descriptor or 0, else the name of ``-result`` (``ENOENT``)."""
    if result >= 0:
        return "ok"
    return errno_mod.errorcode.get(-result, f"EUNKNOWN{-result}")


def is_probe(flags: int) -> bool:
    return (
        flags & os.O_ACCMODE == os.O_RDONLY
        and bool(flags & os.O_NONBLOCK)
        and not flags & os.O_DIRECTORY
    )


def relative_to(path: str, roots: Iterable[str]) -> str | None:
    """``path`` relative to the first root it lies beneath, or None."""
    norm = os.path.normpath(path)
    for root in roots:
        root = os.path.normpath(root)
        if norm == root:
            return "."
        if norm.startswith(root + os.sep):
            return norm[len(root) + 1 :]
    return None


def scenario_roots(root: str | os.PathLike[str]) -> tuple[str, ...]:
    """The spellings of a scenario directory: as given, and with symlinks resolved."""
    given = os.path.abspath(root)
    real = os.path.realpath(root)
    return (given,) if given == real else (given, real)


def normalise_open(
    raw: RawOpen, roots: tuple[str, ...], *, cwd: str | None = None, qemu_cwd: str | None = None
) -> Open | None:
    """One raw open as an :class:`Open`, or None if it is not beneath the scenario."""
    path = raw.path
    rel: str | None
    if os.path.isabs(path):
        rel = relative_to(path, roots)
        joined = _joined_to(path, qemu_cwd) if rel is None else None
        if joined is not None:
            rel = CWD_PREFIX + _mark_roots(joined, roots)
    elif raw.dirfd != "AT_FDCWD":
        return None  # relative to a directory fd we cannot name
    elif cwd is not None:
        rel = relative_to(os.path.join(cwd, path), roots)
    elif os.path.normpath(path) == ".":
        return None  # the working directory itself (opened at start-up, not an image)
    else:
        # QEMU asked for a name relative to its working directory: whatever that
        # is, the open is QEMU's choice and must be compared, so keep it visibly,
        # with the scenario directory inside it (``fat:16:/D/tree``) spelled $D
        rel = CWD_PREFIX + _mark_roots(path, roots)
    if rel is None:
        return None
    rel = _TEMP_NAME.sub(r"\1vl.XXXXXX", rel)
    flags = raw.flags & ~NOISE_FLAGS
    return Open(
        path=rel,
        flags=tuple(flag_names(flags)),
        mode=raw.mode if wants_create(flags) else None,
        result=errno_name(raw.result),
        probe=is_probe(flags),
    )


def _mark_roots(name: str, roots: tuple[str, ...]) -> str:
    for root in roots:
        name = name.replace(root + os.sep, ROOT_MARK + os.sep)
    return name


def _joined_to(path: str, qemu_cwd: str | None) -> str | None:
    """The relative name the hook joined to ``qemu_cwd`` to make ``path``, if it did."""
    if qemu_cwd is None or os.path.normpath(qemu_cwd) == "/":
        return None  # beneath "/" is every path: nothing tells a joined name apart
    prefix = os.path.normpath(qemu_cwd) + os.sep
    return path[len(prefix) :] if path.startswith(prefix) else None


def normalise(
    raws: Iterable[RawOpen],
    root: str | os.PathLike[str],
    *,
    cwd: str | None = None,
    qemu_cwd: str | None = None,
) -> list[Open]:
    """The image opens of ``raws`` beneath ``root``, in order.

    ``qemu_cwd`` is the working directory of a QEMU (or model) that sent its
    relative names through the hook joined to it.
    """
    roots = scenario_roots(root)
    out = []
    for raw in raws:
        o = normalise_open(raw, roots, cwd=cwd, qemu_cwd=qemu_cwd)
        if o is not None:
            out.append(o)
    return out


def from_audit(records: Iterable[AuditRecord]) -> list[RawOpen]:
    return [RawOpen(path=r.path, flags=r.flags, mode=r.mode, result=r.result) for r in records]


# -- strace -------------------------------------------------------------------------

# `openat(AT_FDCWD, "/p", O_RDWR|O_CREAT|O_CLOEXEC, 0644` then `) = 3` or
# `) = -1 ENOENT (...)`; with -f each line starts with the pid.
_CALL = re.compile(
    r"^(?:(?P<pid>\d+)\s+)?(?P<call>openat|open)\((?:(?P<dirfd>AT_FDCWD|-?\d+)(?:<[^>]*>)?, )?"
    r'"(?P<path>(?:[^"\\]|\\.)*)"(?P<trunc>\.\.\.)?, (?P<flags>[A-Z_0-9|]+)(?:, (?P<mode>0\d*))?'
    r"(?P<rest>.*)$"
)
_RESUMED = re.compile(r"^(?:(?P<pid>\d+)\s+)?<\.\.\. (?P<call>openat|open) resumed>(?P<rest>.*)$")
_RESULT = re.compile(r"\)\s+=\s+(?P<value>-?\d+)(?:<[^>]*>)?(?:\s+(?P<err>E[A-Z0-9]+))?")
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|[0-7]{1,3}|.)")
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "v": "\v", "f": "\f", '"': '"', "\\": "\\"}


def _unescape(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        esc = m.group(1)
        if esc[0] == "x" and len(esc) == 3:
            return chr(int(esc[1:], 16))
        if esc[0] in "01234567":
            return chr(int(esc, 8))
        return _SIMPLE_ESCAPES.get(esc, esc)

    raw = _ESCAPE.sub(sub, text)
    # strace escapes bytes; turn the latin-1 code points back into the bytes they were
    return raw.encode("latin-1", "surrogateescape").decode("utf-8", "surrogateescape")


def _result(rest: str, lineno: int, line: str) -> int | None:
    m = _RESULT.search(rest)
    if m is None:
        return None
    value = int(m.group("value"))
    if value >= 0:
        return value
    name = m.group("err")
    if name is None:
        raise StraceParseError(f"strace line {lineno}: failed open without an errno: {line!r}")
    number = getattr(errno_mod, name, None)
    return -number if isinstance(number, int) else -errno_mod.EIO


def parse_strace(text: str) -> list[RawOpen]:
    """The ``open``/``openat`` calls of ``strace -f -s 4096 -e trace=openat,open`` output.

    Calls split by another thread (``<unfinished ...>`` ... ``<... openat
    resumed>``) are joined and kept at the position where they started,
    which is when QEMU asked.  Truncated paths (strace without ``-s``) are an
    error: a shortened path would silently fall outside the scenario.
    """
    out: list[RawOpen | None] = []
    pending: dict[str, tuple[int, RawOpen]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.rstrip()
        if not line:
            continue
        m = _CALL.match(line)
        if m is not None:
            if m.group("trunc"):
                raise StraceParseError(
                    f"strace line {lineno}: path truncated (use -s 4096): {line!r}"
                )
            try:
                flags = parse_flags(m.group("flags"))
            except ValueError as err:
                raise StraceParseError(f"strace line {lineno}: {err}") from err
            raw = RawOpen(
                path=_unescape(m.group("path")),
                flags=flags,
                mode=int(m.group("mode"), 8) if m.group("mode") else 0,
                dirfd=m.group("dirfd") or "AT_FDCWD",
            )
            rest = m.group("rest")
            if "<unfinished ...>" in rest:
                pending[m.group("pid") or ""] = (len(out), raw)
                out.append(None)
                continue
            value = _result(rest, lineno, line)
            if value is None:
                raise StraceParseError(f"strace line {lineno}: open without a result: {line!r}")
            out.append(
                RawOpen(
                    path=raw.path, flags=raw.flags, mode=raw.mode, result=value, dirfd=raw.dirfd
                )
            )
            continue
        r = _RESUMED.match(line)
        if r is not None:
            slot = pending.pop(r.group("pid") or "", None)
            if slot is None:
                continue  # resumed without a start we saw (strace attached late)
            index, raw = slot
            value = _result(r.group("rest"), lineno, line)
            # a thread killed mid-call has no result: treat as not opened
            out[index] = RawOpen(
                path=raw.path,
                flags=raw.flags,
                mode=raw.mode,
                result=value if value is not None else -errno_mod.EINTR,
                dirfd=raw.dirfd,
            )
    return [o for o in out if o is not None]
