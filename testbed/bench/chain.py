"""qcow2 backing chains of a given depth, made once with qemu-img and kept.

Depth D is D qcow2 files: ``l0.qcow2`` (1 MiB, no backing file) and
``l1`` .. ``l{D-1}``, each backed by the one before it under a relative
name, as a chain made by successive snapshots is.  The top is the last.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import BenchUsageError, BuildError, WaitTimeout


@dataclass(frozen=True, kw_only=True)
class Chain:
    directory: Path
    layers: tuple[Path, ...]  # top first

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def top(self) -> Path:
        return self.layers[0]


def make_chain(root: Path, depth: int, *, qemu_img: str = "qemu-img", timeout: float = 60) -> Chain:
    """The chain of ``depth`` under ``root/depth-D`` (reused when already complete)."""
    if depth < 1:
        raise BenchUsageError(f"chain depth {depth} < 1")
    tool = shutil.which(qemu_img)
    if tool is None:
        raise BuildError(f"{qemu_img} is not installed (Debian's qemu-utils): needed for chains")
    directory = (root / f"depth-{depth}").resolve()
    layers = tuple(directory / f"l{i}.qcow2" for i in reversed(range(depth)))
    stamp = directory / ".complete"
    if stamp.exists():
        return Chain(directory=directory, layers=layers)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for i in range(depth):
        argv = [tool, "create", "-q", "-f", "qcow2"]
        if i:
            argv += ["-b", f"l{i - 1}.qcow2", "-F", "qcow2"]
        argv += [f"l{i}.qcow2", "1M"]
        try:
            done = subprocess.run(argv, cwd=directory, capture_output=True, text=True,
                                  timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired as err:
            raise WaitTimeout(f"qemu-img to create layer {i} of {directory}", timeout) from err
        if done.returncode != 0:
            raise BuildError(f"{' '.join(argv)} failed in {directory}", log=done.stderr)
    stamp.touch()
    return Chain(directory=directory, layers=layers)
