"""The report's formatting helpers."""

from __future__ import annotations


def test_short_error_drops_qemus_option_echo() -> None:
    from testbed.compare.report import short_error

    echo = "launch: qemu-system-x86_64: -drive if=none,file=fat:16:/dev/fdset/10: "
    assert short_error(echo + "Could not read directory /dev/fdset/10") == (
        "launch: Could not read directory /dev/fdset/10"
    )
    assert short_error(echo + "Could not dup FD for /dev/fdset/10 flags 2: Permission denied") == (
        "launch: Could not dup FD for /dev/fdset/10 flags 2: Permission denied"
    )
    assert short_error('add: GenericError: Failed to get shared "write" lock') == (
        'add: Failed to get shared "write" lock'
    )
    assert short_error("no colon at all") == "no colon at all"
