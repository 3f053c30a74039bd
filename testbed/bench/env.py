"""What every experiment of one run shares: files, binaries, the floor's program."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from testbed.bench.syscalls import Program


@dataclass(frozen=True, kw_only=True)
class Env:
    work_dir: Path  # build/bench: compiled C, chains, the test file
    file: Path  # the 64 KiB file every ping-pong opens
    warmup: int  # ops before a ping-pong round counts
    qemu_version: str
    c_limit: Path | None = None  # the compiled c_limit.c, None if it failed
    c_limit_error: str = ""
    floor_program: Program | None = None  # derived from an strace of the broker
    floor_error: str = ""
