"""QEMU's file name arithmetic (``util/cutils.c`` path_combine, block.c helpers).

QEMU does not normalise: a backing name ``../base.raw`` of ``/d/sub/top.qcow2``
is opened as ``/d/sub/../base.raw``, and that exact string is what the
broker sees, so the model keeps it too.
"""

from __future__ import annotations


def path_has_protocol(path: str) -> bool:
    """``path_has_protocol``: a ``proto:`` prefix before any ``/``."""
    colon = path.find(":")
    if colon < 0:
        return False
    slash = path.find("/")
    return slash < 0 or colon < slash


def path_combine(base_path: str, filename: str) -> str:
    """``path_combine``: ``filename`` relative to the directory of ``base_path``."""
    if filename.startswith("/"):
        return filename
    start = base_path.find(":") + 1 if path_has_protocol(base_path) else 0
    slash = base_path.rfind("/")
    cut = slash + 1 if slash >= 0 else 0
    cut = max(cut, start)
    return base_path[:cut] + filename
