"""Policy files and flags: valid ones load, invalid ones say what is wrong."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.broker.policy import Access, Grant, Policy
from testbed.errors import PolicyError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "policy.toml"
    p.write_text(text)
    return p


def test_toml_policy(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
refuse_errno = "EPERM"
peer_uid = 107
[[grant]]
path = "/srv/images/"
access = "create"
symlinks = true
[[grant]]
path = "/srv/base"
access = "ro"
""",
    )
    policy = Policy.from_toml(p)
    assert policy.refuse_errno == errno.EPERM
    assert policy.peer_uid == 107
    assert policy.grants[0] == Grant(path="/srv/images", access=Access.CREATE, symlinks=True)
    assert [g for g, _ in policy.covering("/srv/images/a/b")] == [policy.grants[0]]
    assert policy.covering("/srv/imagesX") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[grant]]\npath='rel'\naccess='ro'", "not absolute"),
        ("[[grant]]\npath='/a'\naccess='write'", "not one of ro, rw, create"),
        ("[[grant]]\npath='/a'", "needs 'path' and 'access'"),
        ("[[grant]]\npath='/a'\naccess='ro'\nsymlink=true", "unknown keys"),
        ("refuse_errno='ENOTREAL'", "not an errno"),
        ("bogus=1", "unknown keys"),
        ("grant = 3", "array of tables"),
        ("[[grant]\n", "not valid TOML"),
    ],
)
def test_bad_policy_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message) as info:
        Policy.from_toml(write(tmp_path, text))
    assert str(tmp_path) in str(info.value)


def test_missing_policy_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy"):
        Policy.from_toml(tmp_path / "nope.toml")


def test_longest_grant_wins_but_grants_add_up() -> None:
    policy = Policy.from_grants(ro=["/srv/vm/base"], create=["/srv/vm"])
    covering = policy.covering("/srv/vm/base/disk")
    assert [g.path for g, _ in covering] == ["/srv/vm/base", "/srv/vm"]
    assert covering[0][1] == "disk"


@given(st.integers(0, 0xFFFFFFFF))
def test_needed_access_agrees_with_the_flag_rules(flags: int) -> None:
    from testbed.broker.policy import needed_access
    from testbed.protocol.flags import wants_create, wants_write

    expected = Access.RO
    if wants_create(flags):
        expected = Access.CREATE
    elif wants_write(flags):
        expected = Access.RW
    assert needed_access(flags) is expected
