"""The root side of the supervised mode, without QEMU: its profile and per-start grants."""

from __future__ import annotations

import pytest

from testbed.broker import Access
from testbed.errors import PolicyError
from testbed.libvirt.supervised import PTY_RULE, libvirt_profile, master_key_grants
from testbed.supervise import load_profile

KEY = "/var/lib/libvirt/qemu/domain-7-vm1/master-key.aes"
SECRET = f'{{"qom-type":"secret","id":"masterKey0","format":"raw","file":"{KEY}"}}'


def test_the_master_key_of_this_start_is_granted_read_only() -> None:
    grants = master_key_grants(["qemu", "-name", "guest=vm1", "-object", SECRET], "vm1")
    assert [(g.path, g.access) for g in grants] == [(KEY, Access.RO)]


@pytest.mark.parametrize(
    ("word", "name"),
    [
        (SECRET, "vm2"),  # another domain's key
        (SECRET.replace("domain-7-vm1", "domain-7-vm1/../vm2"), "vm1"),
        (SECRET.replace("master-key.aes", "other.file"), "vm1"),
        (SECRET.replace("/var/lib/libvirt/qemu", "/tmp"), "vm1"),
    ],
)
def test_nothing_else_is_granted(word: str, name: str) -> None:
    assert master_key_grants(["-object", word], name) == ()


def test_libvirt_truncates_long_names_in_its_directories() -> None:
    name = "a-domain-name-longer-than-twenty"
    key = f"/var/lib/libvirt/qemu/domain-3-{name[:20]}/master-key.aes"
    assert [g.path for g in master_key_grants([f"file={key}"], name)] == [key]


def test_the_profile_is_qemus_plus_the_pty_master() -> None:
    base = load_profile("qemu")
    profile = libvirt_profile("qemu")
    assert profile.covers("/dev/ptmx") and not base.covers("/dev/ptmx")
    assert {g.path for g in base.grants} < {g.path for g in profile.grants}
    # /dev/pts is Landlock's (QEMU's own TIOCGPTPEER), never the supervisor's
    assert not profile.covers("/dev/pts/0")
    assert PTY_RULE[0] == "/dev/pts"


def test_an_unknown_base_profile_is_named() -> None:
    with pytest.raises(PolicyError, match="no-such-profile"):
        libvirt_profile("no-such-profile")
