"""What the supervisor tests share besides fixtures (a module name no other test dir uses)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from testbed.supervise import Supervisor


def parse(out: str) -> dict[str, str]:
    """The helper's ``key=value`` lines."""
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


Run = Callable[..., tuple[subprocess.CompletedProcess[str], Supervisor]]
