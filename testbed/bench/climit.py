"""The C baselines: compile ``c_limit.c`` with the system cc and run it.

``c_limit.c`` is shipped as package data and compiled at bench time into a
directory the caller chooses (``build/bench`` for ``make bench``), so the
figures come from this machine's compiler and kernel.
"""

from __future__ import annotations

import array
import contextlib
import enum
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

from testbed.bench.placement import Cpus
from testbed.bench.stats import RunFigures, run_figures
from testbed.errors import BuildError, CBenchError, WaitTimeout


class CMode(enum.Enum):
    PINGPONG = "pingpong"  # request, open in a forked broker, SCM_RIGHTS reply, close
    FLOOR = "floor"  # open + close in the client itself
    PIDFD = "pidfd"  # pidfd_getfd(2) from a forked holder, close


def compile_c_limit(out_dir: Path, *, cc: str = "cc", timeout: float = 120) -> Path:
    """Compile ``c_limit.c`` into ``out_dir/c_limit`` (rebuilt when the source changed)."""
    compiler = shutil.which(cc)
    if compiler is None:
        raise BuildError(f"no C compiler {cc!r} on PATH (needed for the C limit baseline)")
    out_dir.mkdir(parents=True, exist_ok=True)
    source = out_dir / "c_limit.c"
    text = resources.files("testbed.bench").joinpath("c_limit.c").read_bytes()
    binary = out_dir / "c_limit"
    if binary.exists() and source.exists() and source.read_bytes() == text:
        return binary
    source.write_bytes(text)
    argv = [compiler, "-O2", "-Wall", "-Wextra", "-o", str(binary), str(source)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise WaitTimeout(f"{cc} to compile {source}", timeout) from err
    if proc.returncode != 0:
        binary.unlink(missing_ok=True)
        raise BuildError(f"{' '.join(argv)} failed ({proc.returncode})", log=proc.stderr)
    return binary


#: The words before c_limit's own (a supervisor), given the directory its output goes to.
Wrapper = Callable[[Path], list[str]]


def run_c(
    binary: Path,
    mode: CMode,
    path: Path,
    *,
    seconds: float,
    warmup: int,
    cpus: Cpus,
    wrapper: Wrapper | None = None,
) -> RunFigures:
    """One repetition of ``mode`` on ``path`` for ``seconds`` after ``warmup`` ops.

    With ``wrapper``, c_limit runs under the command it gives (pinned where
    the broker side would be); c_limit pins itself.
    """
    with tempfile.TemporaryDirectory(prefix="c_limit.") as tmp:
        out = Path(tmp) / "latencies"
        argv = [
            *(wrapper(Path(tmp)) if wrapper else ()),
            str(binary),
            mode.value,
            str(path),
            f"{seconds:g}",
            str(warmup),
            str(-1 if cpus.broker is None else cpus.broker),
            str(-1 if cpus.client is None else cpus.client),
            str(out),
        ]
        timeout = seconds + 60
        try:
            with inherited_affinity(cpus.broker if wrapper else None):
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise WaitTimeout(f"c_limit {mode.value} to finish", timeout) from err
        if proc.returncode != 0:
            raise CBenchError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
        fields = parse_summary(proc.stdout)
        latencies = array.array("Q")
        latencies.frombytes(out.read_bytes())
    if len(latencies) != int(fields["ops"]):
        raise CBenchError(f"c_limit said ops={fields['ops']} but wrote {len(latencies)} samples")
    broker_cpu = fields["broker_cpu_s"] if mode is not CMode.FLOOR else None
    return run_figures(latencies, fields["seconds"], broker_cpu_s=broker_cpu)


@contextlib.contextmanager
def inherited_affinity(cpu: int | None) -> Iterator[None]:
    """This thread pinned to ``cpu`` meanwhile, so that what it spawns starts there
    (None: unchanged); its own affinity comes back afterwards."""
    saved = os.sched_getaffinity(0)
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        yield
    finally:
        os.sched_setaffinity(0, saved)


def parse_summary(stdout: str) -> dict[str, float]:
    """Parse ``ops=N seconds=S broker_cpu_s=C``; anything else is an error."""
    fields: dict[str, float] = {}
    for item in stdout.split():
        key, sep, value = item.partition("=")
        if not sep:
            raise CBenchError(f"c_limit printed {stdout.strip()!r}, expected key=value pairs")
        try:
            fields[key] = float(value)
        except ValueError as err:
            raise CBenchError(f"c_limit printed {key}={value!r}, not a number") from err
    missing = {"ops", "seconds", "broker_cpu_s"} - fields.keys()
    if missing:
        raise CBenchError(f"c_limit output {stdout.strip()!r} lacks {sorted(missing)}")
    return fields
