"""Symbolic names for the ``O_*`` flags that travel in a ``QEMU_OPEN`` request.

The values are Linux x86_64's (the protocol never leaves one machine).
``O_LARGEFILE`` is listed with the kernel's value, which is what strace
shows even though glibc defines it as 0 on 64-bit hosts.
"""

from __future__ import annotations

import os

from testbed.errors import OpenFlagsError

O_LARGEFILE_KERNEL = 0o100000

#: Access modes: the low two bits, exactly one of these.
ACCESS_MODES = {os.O_RDONLY: "O_RDONLY", os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}

#: Other flags, in the order they are printed (strace's order where it matters).
FLAG_BITS: tuple[tuple[int, str], ...] = (
    (os.O_CREAT, "O_CREAT"),
    (os.O_EXCL, "O_EXCL"),
    (os.O_NOCTTY, "O_NOCTTY"),
    (os.O_TRUNC, "O_TRUNC"),
    (os.O_APPEND, "O_APPEND"),
    (os.O_NONBLOCK, "O_NONBLOCK"),
    (os.O_DSYNC, "O_DSYNC"),
    (0o20000, "FASYNC"),
    (os.O_DIRECT, "O_DIRECT"),
    (O_LARGEFILE_KERNEL, "O_LARGEFILE"),
    (os.O_DIRECTORY, "O_DIRECTORY"),
    (os.O_NOFOLLOW, "O_NOFOLLOW"),
    (os.O_NOATIME, "O_NOATIME"),
    (os.O_CLOEXEC, "O_CLOEXEC"),
    (os.O_SYNC & ~os.O_DSYNC, "__O_SYNC"),
    (os.O_PATH, "O_PATH"),
    (os.O_TMPFILE & ~os.O_DIRECTORY, "__O_TMPFILE"),
)

_BY_NAME: dict[str, int] = {name: bit for bit, name in FLAG_BITS}
_BY_NAME.update({name: bit for bit, name in ACCESS_MODES.items()})
_BY_NAME["O_SYNC"] = os.O_SYNC
_BY_NAME["O_TMPFILE"] = os.O_TMPFILE
_BY_NAME["O_ACCMODE"] = os.O_ACCMODE

#: Flags that say nothing about *what* is opened, dropped when traces are compared.
NOISE_FLAGS = os.O_CLOEXEC | O_LARGEFILE_KERNEL


def flag_names(flags: int) -> list[str]:
    """``O_RDWR|O_CREAT`` style names for ``flags``, access mode first.

    Bits this table does not know come last as one octal number, so nothing
    is silently dropped.
    """
    access = flags & os.O_ACCMODE
    names = [ACCESS_MODES.get(access, "O_ACCMODE")]
    rest = flags & ~os.O_ACCMODE
    for bit, name in FLAG_BITS:
        if rest & bit == bit and bit:
            names.append(name)
            rest &= ~bit
    if rest:
        names.append(f"{rest:#o}")
    return names


def format_flags(flags: int) -> str:
    """``flag_names`` joined with ``|`` like strace prints them."""
    return "|".join(flag_names(flags))


def parse_flags(text: str) -> int:
    """Inverse of :func:`format_flags`; also reads strace's spelling.

    Raises ``ValueError`` naming the first unknown name.
    """
    value = 0
    for part in text.split("|"):
        part = part.strip()
        if not part:
            continue
        if part in _BY_NAME:
            value |= _BY_NAME[part]
        elif part.startswith("0"):
            value |= int(part, 8)
        else:
            raise OpenFlagsError(part, text)
    return value


def wants_write(flags: int) -> bool:
    """Whether an open with ``flags`` can change the file's contents."""
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & (os.O_TRUNC | os.O_APPEND))


def wants_create(flags: int) -> bool:
    """Whether an open with ``flags`` can create a file."""
    return bool(flags & os.O_CREAT) or (flags & os.O_TMPFILE) == os.O_TMPFILE
