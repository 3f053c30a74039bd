"""The testbed's pytest plugin (registered through the ``pytest11`` entry point).

It gives every test suite, ours and users', the same rule for missing
prerequisites: :func:`require` skips with a reason that names what is
missing, except under ``CI=true`` where it fails, because a green CI run that
skipped the real work would hide a broken install step.

Fixtures for the broker and for a patched-QEMU machine are added by
``testbed.qemu.fixtures`` when that part is present.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

pytest_plugins = ["testbed.qemu.fixtures"]


def in_ci() -> bool:
    """True when running under CI (``CI=true``), where prerequisites are mandatory."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(reason: str) -> NoReturn:
    """Skip (locally) or fail (in CI) because a prerequisite is missing."""
    if in_ci():
        pytest.fail(f"prerequisite missing in CI: {reason}", pytrace=False)
    pytest.skip(f"prerequisite missing: {reason}")


def require(condition: bool, reason: str) -> None:
    """Go on only if ``condition`` holds; otherwise :func:`missing`."""
    if not condition:
        missing(reason)
