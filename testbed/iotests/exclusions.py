"""Tests that start qemu-system but are left out of the default selection, and why.

Each entry was seen to be unable to run on this kind of machine (the reason
is the suite's own ``not run`` message, or what we measured), independently
of the hook: an unhooked run shows the same.  Asking for a test by name runs
it anyway.
"""

from __future__ import annotations

#: version -> test -> reason
EXCLUDED: dict[str, dict[str, str]] = {
    "7.2": {},
}


def excluded_for(version: str) -> dict[str, str]:
    return dict(EXCLUDED.get(version, {}))


__all__ = ["EXCLUDED", "excluded_for"]
