"""QEMU's option syntax as the model reads it (keyval, -blockdev JSON, json: names)."""

from __future__ import annotations

import pytest

from testbed.block.options import (
    flag,
    json_filename,
    parse_blockdev_arg,
    parse_keyval,
    split_keyval,
)
from testbed.errors import BlockError


def test_keyval_doubles_commas_and_nests_dotted_keys() -> None:
    assert split_keyval("a=1,b=x,,y,c") == [("a", "1"), ("b", "x,y"), ("c", "")]
    assert parse_keyval("driver=qcow2,file.driver=file,file.filename=/d/a,,b") == {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": "/d/a,b"},
    }
    # -drive's first bare word is the file, -device's the driver
    assert parse_keyval("/d/x.img,if=none", implied="file") == {"file": "/d/x.img", "if": "none"}
    assert parse_keyval("ide-cd,drive=cd0", implied="driver")["driver"] == "ide-cd"


def test_keyval_refuses_a_key_that_is_both_value_and_group() -> None:
    with pytest.raises(BlockError, match="both a value and a group"):
        parse_keyval("file=/x,file.driver=file")
    with pytest.raises(BlockError, match="empty option name"):
        parse_keyval("a=1,,,=2")


def test_blockdev_takes_json_or_keyval() -> None:
    assert parse_blockdev_arg('{"driver": "raw", "read-only": true}')["read-only"] is True
    assert parse_blockdev_arg("driver=raw,read-only=on")["read-only"] == "on"
    with pytest.raises(BlockError, match="not JSON"):
        parse_blockdev_arg("{driver")


def test_json_filenames() -> None:
    name = 'json:{"driver":"qcow2","file":{"driver":"file","filename":"/d/top.qcow2"}}'
    assert json_filename(name, None) == ("qcow2", "/d/top.qcow2")
    assert json_filename('json:{"driver":"file","filename":"/d/x"}', None) == ("raw", "/d/x")
    with pytest.raises(BlockError, match="conflicts"):
        json_filename(name, "raw")
    with pytest.raises(BlockError, match="only a format over driver 'file'"):
        json_filename('json:{"driver":"qcow2","file":{"driver":"nbd"}}', None)
    with pytest.raises(BlockError, match="Could not parse"):
        json_filename("json:{", None)


def test_flags() -> None:
    assert flag("on", what="x") and not flag("off", what="x") and flag(True, what="x")
    with pytest.raises(BlockError, match="x: 'maybe' is not a boolean"):
        flag("maybe", what="x")
