"""The classic-BPF program the supervised process runs on every system call.

A tiny assembler (instructions with symbolic jump targets) and the one
program the supervisor installs, :func:`open_filter`.  Pure: it builds bytes,
it installs nothing (that is :mod:`testbed.supervise.launcher`).

What the filter does, in order (``seccomp_data`` is what it reads):

1. any architecture but x86_64 is killed: an i386 ``int 0x80`` ``open`` is
   number 5, which is ``fstat`` on x86_64, so a filter that only compared
   numbers would let it through;
2. any x32 call (numbers with bit 30 set) is killed, for the same reason;
3. ``open``, ``openat``, ``openat2`` and ``creat`` become notifications for
   the supervisor (``SECCOMP_RET_USER_NOTIF``);
4. ``open_by_handle_at`` fails with ``EPERM`` (it opens by inode, around any
   path policy);
5. ``io_uring_setup``/``_enter``/``_register`` fail with ``ENOSYS``: an
   io_uring ``OPENAT`` never passes through seccomp, and programs fall back
   to other I/O when the kernel seems to lack io_uring;
6. everything else is allowed.

Reference: linux/filter.h, linux/seccomp.h, linux/audit.h;
Documentation/userspace-api/seccomp_filter.rst.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from testbed.errors import BPFProgramError

# -- classic BPF opcodes (linux/bpf_common.h) ------------------------------------------
BPF_LD = 0x00
BPF_JMP = 0x05
BPF_RET = 0x06
BPF_W = 0x00
BPF_ABS = 0x20
BPF_K = 0x00
BPF_JEQ = 0x10
BPF_JGE = 0x30

# -- seccomp return values (linux/seccomp.h) ---------------------------------------------
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_ALLOW = 0x7FFF0000

# -- seccomp_data layout: int nr; u32 arch; u64 instruction_pointer; u64 args[6] -----------
OFFSET_NR = 0
OFFSET_ARCH = 4

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

#: x86_64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl).
NR_OPEN = 2
NR_CREAT = 85
NR_OPENAT = 257
NR_OPEN_BY_HANDLE_AT = 304
NR_IO_URING_SETUP = 425
NR_IO_URING_ENTER = 426
NR_IO_URING_REGISTER = 427
NR_OPENAT2 = 437

#: The calls the supervisor answers.
NOTIFIED = {NR_OPEN: "open", NR_OPENAT: "openat", NR_OPENAT2: "openat2", NR_CREAT: "creat"}
#: Calls refused outright, with the errno they get.
REFUSED = {
    NR_OPEN_BY_HANDLE_AT: errno.EPERM,
    NR_IO_URING_SETUP: errno.ENOSYS,
    NR_IO_URING_ENTER: errno.ENOSYS,
    NR_IO_URING_REGISTER: errno.ENOSYS,
}

_SOCK_FILTER = struct.Struct("=HBBI")  # u16 code; u8 jt; u8 jf; u32 k


@dataclass(frozen=True, slots=True)
class Insn:
    """One instruction; ``jt``/``jf`` are label names (or None for "next")."""

    code: int
    k: int = 0
    jt: str | None = None
    jf: str | None = None


def load(offset: int) -> Insn:
    return Insn(BPF_LD | BPF_W | BPF_ABS, offset)


def jeq(value: int, *, then: str | None = None, otherwise: str | None = None) -> Insn:
    return Insn(BPF_JMP | BPF_JEQ | BPF_K, value, then, otherwise)


def jge(value: int, *, then: str | None = None, otherwise: str | None = None) -> Insn:
    return Insn(BPF_JMP | BPF_JGE | BPF_K, value, then, otherwise)


def ret(value: int) -> Insn:
    return Insn(BPF_RET | BPF_K, value)


def assemble(program: Sequence[Insn | str]) -> bytes:
    """``struct sock_filter[]`` bytes; strings in ``program`` are labels.

    Jumps are forward only (classic BPF), at most 255 instructions ahead.
    """
    labels: dict[str, int] = {}
    insns: list[Insn] = []
    for item in program:
        if isinstance(item, str):
            if item in labels:
                raise BPFProgramError(f"label {item!r} defined twice")
            labels[item] = len(insns)
        else:
            insns.append(item)
    out = bytearray()
    for pc, insn in enumerate(insns):

        def offset(label: str | None, pc: int = pc) -> int:
            if label is None:
                return 0
            if label not in labels:
                raise BPFProgramError(f"jump to undefined label {label!r}")
            delta = labels[label] - pc - 1
            if not 0 <= delta <= 255:
                raise BPFProgramError(f"jump to {label!r} is {delta} instructions (0..255 allowed)")
            return delta

        out += _SOCK_FILTER.pack(insn.code, offset(insn.jt), offset(insn.jf), insn.k)
    if len(insns) > 4096:
        raise BPFProgramError(f"{len(insns)} instructions: seccomp allows 4096")
    return bytes(out)


def open_filter() -> bytes:
    """The supervisor's filter (see the module docstring)."""
    program: list[Insn | str] = [
        load(OFFSET_ARCH),
        jeq(AUDIT_ARCH_X86_64, otherwise="kill"),
        load(OFFSET_NR),
        jge(X32_SYSCALL_BIT, then="kill"),
    ]
    for nr in NOTIFIED:
        program.append(jeq(nr, then="notify"))
    for nr, code in REFUSED.items():
        program.append(jeq(nr, then=f"errno{code}"))
    program.append(ret(SECCOMP_RET_ALLOW))
    program += ["kill", ret(SECCOMP_RET_KILL_PROCESS)]
    program += ["notify", ret(SECCOMP_RET_USER_NOTIF)]
    for code in sorted(set(REFUSED.values())):
        program += [f"errno{code}", ret(SECCOMP_RET_ERRNO | code)]
    return assemble(program)


def run(program: bytes, *, nr: int, arch: int = AUDIT_ARCH_X86_64) -> int:
    """Interpret ``program`` for one call: what the kernel would return (for tests)."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *([0] * 6))
    insns = [_SOCK_FILTER.unpack_from(program, i) for i in range(0, len(program), 8)]
    acc = pc = 0
    while pc < len(insns):
        code, jt, jf, k = insns[pc]
        if code == BPF_LD | BPF_W | BPF_ABS:
            (acc,) = struct.unpack_from("=I", data, k)
        elif code == BPF_RET | BPF_K:
            return int(k)
        elif code == BPF_JMP | BPF_JEQ | BPF_K:
            pc += jt if acc == k else jf
        elif code == BPF_JMP | BPF_JGE | BPF_K:
            pc += jt if acc >= k else jf
        else:
            raise BPFProgramError(f"instruction {pc}: opcode {code:#x} not interpreted")
        pc += 1
    raise BPFProgramError("program fell off its end")
