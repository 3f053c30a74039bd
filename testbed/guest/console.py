"""The guest's serial console, driven with pexpect.

Every wait is a step: a success pattern, failure patterns (a kernel panic,
a failed write...) and its own timeout.  The whole console goes to a log
file, each line stamped with the seconds since the console was opened, so a
failed run can be read back afterwards.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

import pexpect

from testbed.errors import GuestError, WaitTimeout

log = logging.getLogger(__name__)

#: Output that means the guest is broken, whatever step is waiting.
FAILURES: tuple[str, ...] = (
    r"Kernel panic",
    r"WRITE FAILED[^\r\n]*",
    r"FAT MOUNT FAILED[^\r\n]*",
    r"FAT READ FAILED[^\r\n]*",
    r"TESTBED-GUEST: insmod \S+ failed",
    r"TESTBED-GUEST: no /dev/vda",
    r"I/O error, dev vda[^\r\n]*",
)
PROMPT = r"tb# "


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """One completed (or failed) console step, for printing and ``--json``."""

    name: str
    ok: bool
    seconds: float
    detail: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "detail": self.detail,
        }


class TimestampLog:
    """A pexpect ``logfile_read`` that writes whole lines, each with a timestamp."""

    def __init__(self, path: Path, start: float) -> None:
        self._file: IO[str] = path.open("w", encoding="utf-8", errors="replace")
        self._start = start
        self._partial = ""

    def write(self, data: str) -> None:
        self._partial += data.replace("\r", "")
        *lines, self._partial = self._partial.split("\n")
        stamp = time.monotonic() - self._start
        for line in lines:
            self._file.write(f"[{stamp:8.3f}] {line}\n")
        self._file.flush()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if self._partial:
            self.write("\n")
        self._file.close()


class Console:
    """Expect-based steps over a pexpect child (``fdspawn`` on the serial socket).

    ``on_step`` is called with each :class:`StepResult` as it finishes, so a
    command can print progress live.
    """

    def __init__(
        self,
        child: Any,
        log_path: Path,
        *,
        on_step: Callable[[StepResult], None] | None = None,
    ) -> None:
        self.child = child
        self.log_path = log_path
        self.start = time.monotonic()
        self._log = TimestampLog(log_path, self.start)
        child.logfile_read = self._log
        self._on_step = on_step
        self.steps: list[StepResult] = []

    def close(self) -> None:
        self.child.logfile_read = None
        self._log.close()

    def tail(self, lines: int = 30) -> str:
        """The last lines of the console log (for error messages)."""
        self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _record(self, result: StepResult) -> None:
        self.steps.append(result)
        log.info(
            "step %s: %s in %.2fs %s",
            result.name,
            "ok" if result.ok else "FAILED",
            result.seconds,
            result.detail,
        )
        if self._on_step is not None:
            self._on_step(result)

    def expect(
        self,
        name: str,
        pattern: str,
        *,
        timeout: float,
        send: str | None = None,
        failures: Sequence[str] = FAILURES,
        record: bool = True,
    ) -> re.Match[str]:
        """Send ``send`` (if any), then wait for ``pattern``.

        Raises :class:`GuestError` when a failure pattern shows, the console
        closes, or ``timeout`` runs out (chained from :class:`WaitTimeout`).
        """
        t0 = time.monotonic()
        if send is not None:
            self.child.sendline(send)
        patterns = [pattern, *failures, pexpect.EOF, pexpect.TIMEOUT]
        try:
            index = self.child.expect(patterns, timeout=timeout)
        except OSError as err:
            # fdspawn reports a closed socket as an OSError on some paths
            self._fail(name, t0, f"console read failed: {err}", err)
        seconds = time.monotonic() - t0
        if index == 0:
            match: re.Match[str] = self.child.match
            if record:
                self._record(
                    StepResult(name=name, ok=True, seconds=seconds, detail=match.group(0).strip())
                )
            return match
        if index == len(patterns) - 1:
            cause = WaitTimeout(f"guest step {name!r} (pattern {pattern!r})", timeout)
            self._fail(name, t0, str(cause), cause)
        if index == len(patterns) - 2:
            self._fail(name, t0, f"console closed (QEMU exited?) while waiting for {pattern!r}")
        self._fail(name, t0, f"failure pattern: {self.child.match.group(0).strip()!r}")

    def _fail(self, name: str, t0: float, message: str, cause: Exception | None = None) -> NoReturn:
        self._record(StepResult(name=name, ok=False, seconds=time.monotonic() - t0, detail=message))
        raise GuestError(name, message, console_tail=self.tail()) from cause

    def command(self, name: str, line: str, pattern: str, *, timeout: float) -> re.Match[str]:
        """Run a shell command and wait for its result and the next prompt."""
        match = self.expect(name, pattern, send=line, timeout=timeout)
        self.expect(f"{name}: prompt", PROMPT, timeout=timeout, record=False)
        return match
