"""Directory entries of QEMU's vvfat: 8.3 names, long names, FAT timestamps.

Ported from QEMU 7.2 ``block/vvfat.c`` (``create_long_filename``,
``create_short_filename``, ``to_valid_short_char``, ``fat_chksum``,
``fat_datetime``), including its quirks, because the model must produce the
same bytes: long-name entries are made for every name (even valid 8.3 ones),
``strchr`` in ``to_valid_short_char`` sees only the low byte of a character,
and the ``~N`` tail is written over the name without clearing it first.

A directory entry (32 bytes, little endian)::

    0  name[11]  11 attributes  12 reserved[2]  14 ctime  16 cdate  18 adate
    20 begin_hi  22 mtime  24 mdate  26 begin  28 size

A long-name entry uses bytes 1-10, 14-25 and 28-31 for 13 UTF-16 units,
byte 0 for its sequence number, byte 11 = 0x0f and byte 13 for the checksum
of the short name.
"""

from __future__ import annotations

import struct
import time

from testbed.errors import BlockUsageError

ENTRY_SIZE = 32
ATTR_LONG_NAME = 0x0F
ATTR_DIRECTORY = 0x10
ATTR_ARCHIVE = 0x20
ATTR_VOLUME_LABEL = 0x28
DIR_KANJI = 0xE5
DIR_KANJI_FAKE = 0x05

# The byte offsets inside a long-name entry of its 13 UTF-16 units (26 bytes).
_LFN_OFFSETS = [*range(1, 11), *range(14, 26), *range(28, 32)]
_SHORT_CHAR_EXTRA = b"$%'-_@~`!(){}^#&"


def fat_datetime(seconds: int, *, return_time: bool) -> int:
    """QEMU's ``fat_datetime``: a FAT time or date of a ``time_t`` in local time."""
    t = time.localtime(seconds)
    if return_time:
        value = (t.tm_sec // 2) | (t.tm_min << 5) | (t.tm_hour << 11)
    else:
        value = t.tm_mday | (t.tm_mon << 5) | ((t.tm_year - 1980) << 9)
    return value & 0xFFFF


def fat_chksum(short_name: bytes) -> int:
    """Checksum of an 11-byte short name, stored in its long-name entries."""
    chksum = 0
    for byte in short_name[:11]:
        chksum = ((((chksum & 0xFE) >> 1) | (0x80 if chksum & 1 else 0)) + byte) & 0xFF
    return chksum


def is_long_name(entry: bytes | bytearray | memoryview) -> bool:
    return entry[11] == ATTR_LONG_NAME


def long_name_entries(filename: str) -> list[bytearray]:
    """``create_long_filename``: the long-name entries, in directory order.

    Returns no entries when the name is not valid UTF-8 (QEMU prints an
    error and keeps only the short name).  The checksum byte is left 0 for
    the caller to fill in.
    """
    try:
        utf16 = filename.encode("utf-8", "surrogateescape").decode("utf-8").encode("utf-16-le")
    except UnicodeDecodeError:
        return []
    length = len(utf16) // 2
    count = -(-(length * 2) // 26)
    entries = [bytearray(ENTRY_SIZE) for _ in range(count)]
    for i, entry in enumerate(entries):
        entry[11] = ATTR_LONG_NAME
        entry[0] = (count - i) | (0x40 if i == 0 else 0)
    # The name, NUL-terminated then 0xff-padded, fills the entries from the
    # last one backwards: the last entry in the directory holds its start.
    padded = utf16 + b"\0\0"
    for i in range(26 * count):
        entry = entries[count - 1 - i // 26]
        offset = _LFN_OFFSETS[i % 26]
        entry[offset] = padded[i] if i < 2 * length + 2 else 0xFF
    return entries


def _to_valid_short_char(ch: str) -> int:
    upper = ch.upper()
    code = ord(upper if len(upper) == 1 else ch)
    low = code & 0xFF
    # C's strchr() converts the character to char (its low byte), and finds
    # the terminating NUL for a low byte of 0 (which then reads as "invalid").
    if 0x30 <= code <= 0x39 or 0x41 <= code <= 0x5A or low == 0 or low in _SHORT_CHAR_EXTRA:
        return low
    return 0


def short_name(filename: str, existing: list[bytes]) -> bytes:
    """``create_short_filename``: the 11-byte 8.3 name, unique among ``existing``.

    ``existing`` are the 11-byte names of the entries already in this
    directory that are not long-name entries (the volume label, ``.`` and
    ``..`` included, as in QEMU).
    """
    name = bytearray(b" " * 11)
    j = 0
    last_dot: int | None = None
    lossy = False
    chars = filename.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    for index, ch in enumerate(chars):
        if ch == ".":
            if j == 0:
                lossy = True
            else:
                if last_dot is not None:
                    lossy = True
                last_dot = index
        elif last_dot is None:
            v = _to_valid_short_char(ch)
            if j < 8 and v:
                name[j] = v
                j += 1
            else:
                lossy = True
    if last_dot is not None:
        j = 0
        for ch in chars[last_dot + 1 :]:
            v = _to_valid_short_char(ch)
            if j < 3 and v:
                name[8 + j] = v
                j += 1
            else:
                lossy = True
    if name[0] == DIR_KANJI:
        name[0] = DIR_KANJI_FAKE

    # The tail goes after the base name's first blank (or at its end).
    j = name.index(b" ") if b" " in name[:8] else 8
    taken = set(existing)
    for i in range(1 if lossy else 0, 999999):
        if i > 0:
            tail = f"~{i}".encode()
            start = min(j, 8 - len(tail))
            name[start : start + len(tail)] = tail
        if bytes(name) not in taken:
            return bytes(name)
    raise BlockUsageError(f"vvfat: no free short name for {filename!r}")


def short_entry(name: bytes) -> bytearray:
    """A short entry holding only its name (fields are filled by the scan)."""
    entry = bytearray(ENTRY_SIZE)
    entry[0:11] = name
    return entry


def set_begin(entry: bytearray, cluster: int) -> None:
    """``set_begin_of_direntry``: low 16 bits in ``begin``, high in ``begin_hi``."""
    struct.pack_into("<H", entry, 26, cluster & 0xFFFF)
    struct.pack_into("<H", entry, 20, (cluster >> 16) & 0xFFFF)
