"""On-disk headers declared once: field names and struct codes, in order.

A format declares each fixed-layout header as a :class:`HeaderLayout`; the
struct format, the size and every field's offset are derived from that one
list, so a corruption error names a field and its offset comes from the
declaration rather than from a literal typed again beside the check.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from testbed.errors import BlockUsageError, CorruptImageError


@dataclass(frozen=True)
class HeaderLayout:
    """A fixed header: ``fields`` are ``(name, struct code)`` pairs from ``start`` on.

    ``byte_order`` is ``">"`` or ``"<"`` (standard sizes, no padding: the
    offsets are the running sums of the fields' sizes).
    """

    fmt: str
    byte_order: str
    fields: Sequence[tuple[str, str]]
    start: int = 0
    struct: struct.Struct = field(init=False, repr=False, compare=False)
    offsets: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.byte_order not in (">", "<"):
            raise BlockUsageError(f"byte order {self.byte_order!r}: use '>' or '<'")
        offsets: dict[str, int] = {}
        pos = self.start
        for name, code in self.fields:
            if name in offsets:
                raise BlockUsageError(f"{self.fmt} header: field {name!r} declared twice")
            offsets[name] = pos
            pos += struct.calcsize(self.byte_order + code)
        object.__setattr__(
            self, "struct", struct.Struct(self.byte_order + "".join(c for _, c in self.fields))
        )
        object.__setattr__(self, "offsets", offsets)

    @property
    def size(self) -> int:
        return self.struct.size

    @property
    def end(self) -> int:
        """The offset just past the header (``start + size``)."""
        return self.start + self.struct.size

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.fields)

    def offset(self, name: str) -> int:
        """The file offset of field ``name`` (a ``KeyError`` for a name not declared)."""
        return self.offsets[name]

    def unpack(self, buf: bytes, offset: int | None = None) -> tuple[Any, ...]:
        """The fields' values in declaration order, read at ``offset`` (default ``start``)."""
        return self.struct.unpack_from(buf, self.start if offset is None else offset)

    def unpack_dict(self, buf: bytes, offset: int | None = None) -> dict[str, Any]:
        """The fields' values by name, read at ``offset`` (default ``start``)."""
        return dict(zip(self.names, self.unpack(buf, offset), strict=True))

    def pack(self, *values: Any) -> bytes:
        return self.struct.pack(*values)

    def corrupt(
        self, name: str, message: str, *, field: str | None = None, at: int | None = None
    ) -> CorruptImageError:
        """The error for a bad field ``name``, at its declared offset.

        ``field`` overrides the name shown (e.g. ``l1_table`` for a check made
        on the table that ``l1_table_offset`` points at); ``at`` is where this
        copy of the header starts in the file, when not at ``start`` (a
        footer, a header a field pointed to).
        """
        offset = self.offset(name) if at is None else at + self.offset(name) - self.start
        return CorruptImageError(fmt=self.fmt, field=field or name, offset=offset, message=message)


def find(layouts: Sequence[HeaderLayout], name: str) -> HeaderLayout:
    """The one of ``layouts`` declaring field ``name`` (for a header in several parts).

    A name none declares is a bug in the caller: :class:`BlockUsageError`.
    """
    for layout in layouts:
        if name in layout.offsets:
            return layout
    raise BlockUsageError(f"no header field {name!r} declared")
