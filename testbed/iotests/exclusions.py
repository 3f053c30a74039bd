"""Tests that start qemu-system but are left out of the default selection, and why.

Each was seen to be unable to run here *unhooked* (``testbed iotests``,
2026-12-01, both versions): the reason is the suite's own ``not run``
message, with what it means on this machine.  Asking for a test by name
runs it anyway; on a machine that has what it needs, drop the entry.
"""

from __future__ import annotations

_PROTOCOL = "needs another image protocol than file (the harness runs check -file): "
_XTS = "LUKS with aes-xts: the build has no crypto library (Unsupported cipher mode xts)"
_FUSE = "needs FUSE exports or sudo for losetup, neither available here (No FUSE support)"

_COMMON: dict[str, str] = {
    "087": _XTS,
    "094": _PROTOCOL + "nbd",
    "108": _FUSE,
    "109": "qed is not in the build (qed not available)",
    "119": _PROTOCOL + "nbd",
    "147": _PROTOCOL + "nbd",
    "173": _PROTOCOL + "nfs",
    "205": _PROTOCOL + "nbd",
    "206": _XTS,
    "207": _PROTOCOL + "ssh",
    "232": "checks read-only files, which root can write (we run as root)",
    "295": _XTS,
    "308": _FUSE,
    "fuse-allow-other": "needs password-less sudo as nobody and FUSE",
}

#: version -> test -> reason
EXCLUDED: dict[str, dict[str, str]] = {
    "7.2": {
        **_COMMON,
        "183": "block migration (migrate -b) is not compiled in",
        "nbd-multiconn": "libnbd is not installed",
    },
    "10.0": {
        **_COMMON,
        "file-io-error": _FUSE,
        "nbd-multiconn": "libnbd's Python bindings are not installed",
        "nbd-tls-iothread": "certtool (gnutls-bin) is not installed",
    },
}


def excluded_for(version: str) -> dict[str, str]:
    return dict(EXCLUDED.get(version, {}))


__all__ = ["EXCLUDED", "excluded_for"]
