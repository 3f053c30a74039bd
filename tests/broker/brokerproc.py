"""A real broker process, as root or as an unprivileged user with no capabilities.

``broker_proc`` starts ``python -m testbed.broker --socket`` with a TOML
policy, optionally under ``prlimit`` and ``setpriv`` (uid/gid 65534, no
groups, every capability dropped from the inheritable and bounding sets),
and gives the test what it needs to check the broker from outside: its
descriptor count, RSS, CPU time, stderr and audit log.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from testbed.pytest_plugin import missing
from testbed.transport import HookClient

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
UNPRIVILEGED = [
    "setpriv",
    f"--reuid={NOBODY}",
    f"--regid={NOBODY}",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
]


def wait_for(cond: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def toml_policy(grants: list[dict[str, Any]]) -> str:
    lines = []
    for g in grants:
        lines.append("[[grant]]")
        for key, value in g.items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


class BrokerProc:
    """One ``testbed.broker`` process serving a UNIX socket."""

    def __init__(
        self,
        workdir: Path,
        grants: list[dict[str, Any]],
        *,
        user: str = "root",
        nofile: int | None = None,
        audit: bool = True,
        extra: tuple[str, ...] = (),
    ) -> None:
        run = workdir / f"run-{time.monotonic_ns()}"
        run.mkdir(mode=0o777)
        run.chmod(0o777)
        self.socket_path = run / "b.sock"
        self.audit_path = run / "audit.jsonl"
        policy = run / "policy.toml"
        policy.write_text(toml_policy(grants))
        policy.chmod(0o644)
        argv: list[str] = []
        if nofile is not None:
            argv += ["prlimit", f"--nofile={nofile}:{nofile}", "--"]
        if user == "nobody":
            if shutil.which("setpriv") is None:
                missing("setpriv (util-linux) to run the broker as an unprivileged user")
            argv += UNPRIVILEGED
        argv += [sys.executable, "-m", "testbed.broker", "--socket", str(self.socket_path)]
        argv += ["--policy", str(policy), *extra]
        if audit:
            argv += ["--audit", str(self.audit_path)]
        self.stderr_path = run / "stderr"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - lives as long as the process
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(argv, cwd=run, stderr=self._stderr, env=env)
        self.user = user
        wait_for(
            lambda: self.socket_path.exists() or self.proc.poll() is not None,
            f"the broker's socket {self.socket_path}",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"broker exited {self.proc.returncode}: {self.stderr()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def broker_pid(self) -> int:
        """The python process itself (prlimit and setpriv exec, so the same pid)."""
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def raw(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(self.socket_path))
        return s

    def client(self, timeout: float = 10.0) -> HookClient:
        return HookClient(self.raw(), timeout=timeout)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def cpu_seconds(self) -> float:
        """CPU time used so far (ns resolution, from schedstat)."""
        return int(Path(f"/proc/{self.pid}/schedstat").read_text().split()[0]) / 1e9

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    def stop(self) -> str:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
        return self.stderr_path.read_text(errors="replace")


def need_root() -> None:
    if os.geteuid() != 0:
        missing("root (mounts, device nodes, setpriv)")
