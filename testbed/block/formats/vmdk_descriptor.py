"""The VMDK text descriptor, read the way QEMU 7.2's block/vmdk.c reads it.

QEMU does not parse the descriptor as a grammar: it runs ``strstr`` for a
few keys and ``sscanf`` on every line.  The model repeats that exactly,
because the quirks decide which files QEMU opens:

- an extent line is ``sscanf(p, "%10s %ld %10s \\"%511[^\\n\\r\\"]\\" %ld")``
  from the start of each line, and ``sscanf`` skips *any* white space,
  newlines included: an empty line just before an extent line parses as
  that extent line, so QEMU opens the extent twice (``qemu-img info``
  agrees: the disk grows by one extent);
- only lines whose access word is exactly ``RW`` are used: ``RDONLY``,
  ``NOACCESS`` and ``ZERO`` extents are skipped in 7.2, not opened;
- ``createType``, ``CID``, ``parentCID`` and ``parentFileNameHint`` are
  found with ``strstr`` anywhere in the text (comments included) and the
  value is taken a fixed number of characters after the key.

Texts are bytes; C strings end at the first NUL.  Reference: VMware,
"Virtual Disk Format 5.0", section "The Descriptor File";
QEMU 7.2 ``vmdk_parse_extents``, ``vmdk_parse_description``,
``vmdk_parent_open``, ``vmdk_read_cid``, ``vmdk_probe``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from testbed.block.formats.vmdk_layout import FORMAT
from testbed.errors import CorruptImageError

#: vmdk_read_cid and vmdk_parent_open read this many bytes of descriptor.
DESC_SIZE = 20 * 512
#: vmdk_read_desc reads at most this much (1 MiB - 1) of a descriptor.
MAX_DESC_READ = (1 << 20) - 1
#: bs->auto_backing_file is PATH_MAX bytes including the NUL.
MAX_BACKING_NAME = 4096 - 1

_SPACE = b" \t\n\v\f\r"
_INT64_MAX = (1 << 63) - 1
_INT64_MIN = -(1 << 63)

#: createTypes vmdk_open_desc_file accepts in a text descriptor.
TEXT_CREATE_TYPES = (
    "monolithicFlat",
    "vmfs",
    "vmfsSparse",
    "seSparse",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
)
EXTENT_TYPES = ("FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE")


def cstring(buf: bytes, start: int = 0) -> bytes:
    """The C string at ``start``: up to (not including) the first NUL."""
    end = buf.find(b"\0", start)
    return buf[start:] if end < 0 else buf[start:end]


class _Scanner:
    """Just enough of glibc's ``sscanf`` for the conversions vmdk.c uses."""

    def __init__(self, text: bytes, pos: int = 0) -> None:
        self.text = text
        self.pos = pos

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _SPACE:
            self.pos += 1

    def string(self, width: int) -> bytes | None:
        """``%Ns``: skip white space, then 1..width non-space bytes."""
        self.skip_space()
        start = self.pos
        while (
            self.pos < len(self.text)
            and self.pos - start < width
            and self.text[self.pos] not in _SPACE
        ):
            self.pos += 1
        return self.text[start : self.pos] if self.pos > start else None

    def integer(self, base: int) -> int | None:
        """``%ld`` (base 10) or ``%x`` (base 16), clamped like strtol."""
        self.skip_space()
        text, pos = self.text, self.pos
        sign = 1
        if pos < len(text) and text[pos] in b"+-":
            sign = -1 if text[pos] == ord("-") else 1
            pos += 1
        digits = b"0123456789abcdefABCDEF" if base == 16 else b"0123456789"
        if base == 16 and text[pos : pos + 2] in (b"0x", b"0X"):
            if pos + 2 < len(text) and text[pos + 2] in digits:
                pos += 2
            else:
                # "0x" with no hex digit after it: glibc takes the 0.
                self.pos = pos + 1
                return 0
        start = pos
        while pos < len(text) and text[pos] in digits:
            pos += 1
        if pos == start:
            return None
        self.pos = pos
        value = sign * int(text[start:pos], base)
        return max(_INT64_MIN, min(_INT64_MAX, value))

    def literal(self, char: bytes) -> bool:
        if self.text[self.pos : self.pos + 1] == char:
            self.pos += 1
            return True
        return False

    def scanset_not(self, excluded: bytes, width: int) -> bytes | None:
        """``%N[^...]``: 1..width bytes not in ``excluded`` (no space skipping)."""
        start = self.pos
        while (
            self.pos < len(self.text)
            and self.pos - start < width
            and self.text[self.pos] not in excluded
        ):
            self.pos += 1
        return self.text[start : self.pos] if self.pos > start else None


@dataclass(frozen=True, kw_only=True)
class ExtentLine:
    """What ``sscanf`` got from one descriptor line.

    ``matches`` is sscanf's return value (0..5); fields past it are unset.
    """

    line_offset: int
    matches: int
    access: bytes = b""
    sectors: int = 0
    type: bytes = b""
    filename: bytes = b""
    flat_offset: int = -1


def scan_extent_line(text: bytes, pos: int) -> ExtentLine:
    """Run vmdk_parse_extents' sscanf on ``text`` from ``pos`` (a line start)."""
    sc = _Scanner(text, pos)
    access = sc.string(10)
    if access is None:
        return ExtentLine(line_offset=pos, matches=0)
    sectors = sc.integer(10)
    if sectors is None:
        return ExtentLine(line_offset=pos, matches=1, access=access)
    kind = sc.string(10)
    if kind is None:
        return ExtentLine(line_offset=pos, matches=2, access=access, sectors=sectors)
    sc.skip_space()
    name = sc.scanset_not(b'\n\r"', 511) if sc.literal(b'"') else None
    if name is None:
        return ExtentLine(line_offset=pos, matches=3, access=access, sectors=sectors, type=kind)
    flat_offset = sc.integer(10) if sc.literal(b'"') else None
    if flat_offset is None:
        return ExtentLine(
            line_offset=pos, matches=4, access=access, sectors=sectors, type=kind, filename=name
        )
    return ExtentLine(
        line_offset=pos,
        matches=5,
        access=access,
        sectors=sectors,
        type=kind,
        filename=name,
        flat_offset=flat_offset,
    )


@dataclass(frozen=True, kw_only=True)
class ExtentSpec:
    """An extent line QEMU acts on: it opens ``filename`` for it."""

    line_offset: int
    sectors: int
    type: str
    filename: bytes
    #: Byte offset of the extent's data in a FLAT or VMFS file (0 otherwise).
    flat_offset: int


def _line_text(text: bytes, pos: int) -> str:
    end = text.find(b"\n", pos)
    return text[pos : len(text) if end < 0 else end].decode("utf-8", "replace")


def iter_extent_lines(text: bytes) -> Iterator[ExtentSpec]:
    """The extents vmdk_parse_extents opens, in order, one line at a time.

    ``text`` is the descriptor as a C string (cut at its first NUL).  QEMU
    opens each extent before it looks at the next line, so a caller that
    opens as it iterates sees an invalid line only after the extents above
    it were opened, as QEMU does.  Raises CorruptImageError for a line QEMU
    calls "Invalid extent line".
    """
    text = cstring(text)
    pos = 0
    while pos < len(text):
        line = scan_extent_line(text, pos)
        nl = text.find(b"\n", pos)
        next_pos = len(text) if nl < 0 else nl + 1
        if line.matches >= 4 and line.access == b"RW":
            if line.type == b"FLAT":
                valid = line.matches == 5 and line.flat_offset >= 0
                flat_offset = line.flat_offset
            else:
                valid = line.matches == 4
                flat_offset = 0
            if not valid:
                raise CorruptImageError(
                    fmt=FORMAT,
                    field="extent line",
                    offset=pos,
                    message=f"invalid extent line: {_line_text(text, pos)!r}",
                )
            kind = line.type.decode("ascii", "replace")
            if line.sectors > 0 and kind in EXTENT_TYPES:
                yield ExtentSpec(
                    line_offset=pos,
                    sectors=line.sectors,
                    type=kind,
                    filename=line.filename,
                    flat_offset=flat_offset,
                )
        pos = next_pos


def parse_extent_lines(text: bytes) -> list[ExtentSpec]:
    """All of :func:`iter_extent_lines` at once."""
    return list(iter_extent_lines(text))


def find_value(text: bytes, key: bytes, max_len: int = 127) -> bytes | None:
    """vmdk_parse_description: the value in ``key="value"`` after the first ``key``.

    QEMU skips ``len(key) + 2`` characters without looking at them.
    """
    text = cstring(text)
    at = text.find(key)
    if at < 0:
        return None
    start = at + len(key) + 2
    if start >= len(text):
        return None
    end = text.find(b'"', start)
    if end < 0 or end - start + 1 > max_len + 1:
        return None
    return text[start:end]


def parse_create_type(text: bytes) -> str:
    """The createType of a text descriptor, checked like vmdk_open_desc_file."""
    value = find_value(text, b"createType")
    if value is None:
        raise CorruptImageError(
            fmt=FORMAT, field="createType", offset=0, message="invalid VMDK image descriptor"
        )
    create_type = value.decode("utf-8", "replace")
    if create_type not in TEXT_CREATE_TYPES:
        raise CorruptImageError(
            fmt=FORMAT,
            field="createType",
            offset=0,
            message=f"unsupported image type {create_type!r}",
        )
    return create_type


def parse_parent_hint(desc: bytes, *, base: int) -> str | None:
    """vmdk_parent_open on the DESC_SIZE bytes at the descriptor offset ``base``.

    None when there is no ``parentFileNameHint`` (or it is empty, which QEMU
    treats as no backing file).
    """
    buf = desc[:DESC_SIZE] + b"\0"
    at = cstring(buf).find(b"parentFileNameHint")
    if at < 0:
        return None
    # p_name += sizeof("parentFileNameHint") + 1: skips the key and '="'.
    start = min(at + len(b"parentFileNameHint") + 2, len(buf) - 1)
    value = cstring(buf, start)
    end = value.find(b'"')
    if end < 0:
        raise CorruptImageError(
            fmt=FORMAT,
            field="parentFileNameHint",
            offset=base + at,
            message="no closing quote after the name",
        )
    if end > MAX_BACKING_NAME:
        raise CorruptImageError(
            fmt=FORMAT,
            field="parentFileNameHint",
            offset=base + at,
            message=f"name of {end} bytes is over PATH_MAX",
        )
    return os.fsdecode(value[:end]) or None


def parse_cid(desc: bytes, key: bytes, *, base: int) -> int:
    """vmdk_read_cid: the hex number after the first ``key`` (``CID``/``parentCID``)."""
    buf = desc[:DESC_SIZE].ljust(DESC_SIZE, b"\0")[: DESC_SIZE - 1] + b"\0"
    at = cstring(buf).find(key)
    if at < 0:
        raise CorruptImageError(
            fmt=FORMAT,
            field=key.decode(),
            offset=base,
            message=f"no {key.decode()} in the descriptor",
        )
    # p_name += sizeof(key): the key and one character ('=').
    start = min(at + len(key) + 1, len(buf) - 1)
    value = _Scanner(cstring(buf, start)).integer(16)
    if value is None:
        raise CorruptImageError(
            fmt=FORMAT,
            field=key.decode(),
            offset=base + at,
            message=f"no hex number after {key.decode()}",
        )
    return value & 0xFFFF_FFFF


def probe_text(buf: bytes) -> int:
    """vmdk_probe's text branch: comments and blank lines, then ``version=1|2|3``."""
    p, end = 0, len(buf)
    while p < end:
        c = buf[p]
        if c == ord("#"):
            nl = buf.find(b"\n", p)
            p = end if nl < 0 else nl + 1
            continue
        if c == ord(" "):
            while p < end and buf[p] == ord(" "):
                p += 1
            if p < end and buf[p] == ord("\r"):
                p += 1
            if p == end or buf[p] != ord("\n"):
                return 0
            p += 1
            continue
        for version in (b"1", b"2", b"3"):
            if buf.startswith(b"version=" + version + b"\n", p) or buf.startswith(
                b"version=" + version + b"\r\n", p
            ):
                return 100
        return 0
    return 0
