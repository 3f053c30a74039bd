"""Fixtures for the QEMU tests: images made fresh with qemu-img in the test's tmp_path."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from qemu_images import Images, Open, make_images, select_opens, strace_opens

from testbed.broker import AuditRecord
from testbed.pytest_plugin import require


@pytest.fixture
def images(tmp_path: Path) -> Images:
    require(shutil.which("qemu-img") is not None, "qemu-img (apt-get install qemu-utils)")
    return make_images(tmp_path)


@pytest.fixture
def opens() -> Callable[[Iterable[AuditRecord], Path], list[Open]]:
    """The audit records of files below a directory, normalised, in order."""
    return select_opens


@pytest.fixture
def strace() -> Callable[[Path, Path], list[Open]]:
    """openat() calls below a directory in an strace log, normalised."""
    require(shutil.which("strace") is not None, "strace (apt-get install strace)")
    return strace_opens
