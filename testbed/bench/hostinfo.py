"""What machine a benchmark ran on, recorded next to its figures."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The first ``model name`` in /proc/cpuinfo, or ``unknown``."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return "unknown"


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: others' work on a shared machine is noise."""
    return [round(x, 2) for x in os.getloadavg()]


def describe() -> dict[str, object]:
    """The machine facts the JSON output records."""
    return {
        "cpu_model": cpu_model(),
        "nproc": os.cpu_count(),
        "usable_cpus": sorted(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "hostname": platform.node(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_at_start": load_average(),
    }
