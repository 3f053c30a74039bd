"""Image options built in one place (qemu.commandline.Attach), pinned byte for byte (no QEMU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed.compare.ops import OpContext
from testbed.compare.ops.hotplug import add_args
from testbed.compare.scenarios import attach_args
from testbed.errors import CommandLineError
from testbed.guest.disk import Disk
from testbed.guest.session import Session, SessionConfig
from testbed.qemu.commandline import (
    Attach,
    AttachKind,
    blockdev_json,
    drive_keyval,
    parse_drive,
)


def _session(tmp_path: Path, fmt: str, path: str) -> Session:
    session = Session(SessionConfig(fmt=fmt, workdir=tmp_path))
    session.disk = Disk(path=Path(path), fmt=fmt)
    return session


def test_the_guest_boot_attaches_its_disk_as_it_always_has(tmp_path: Path) -> None:
    assert _session(tmp_path, "qcow2", "/i/disk.qcow2").attach().argv() == (
        "-drive",
        "file=/i/disk.qcow2,format=qcow2,cache=writeback,if=none,id=disk0",
        "-device",
        "virtio-blk-pci,drive=disk0",
    )
    assert _session(tmp_path, "vvfat", "/i/tree").attach().argv() == (
        "-drive",
        "file=fat:/i/tree,format=raw,readonly=on,if=none,id=disk0",
        "-device",
        "virtio-blk-pci,drive=disk0",
    )


@pytest.mark.parametrize(
    ("attach", "options", "extra"),
    [
        ("drive", {}, {}),
        ("drive", {"read_only": True}, {"read_only": True}),
        ("drive", {"cache_direct": True}, {"cache_direct": True}),
        ("snapshot-on", {}, {"snapshot": True}),
    ],
)
def test_the_scenario_drives_are_what_the_builder_writes(
    attach: str, options: dict[str, bool], extra: dict[str, bool]
) -> None:
    _, args = attach_args(attach, **options)
    built = Attach(filename="$IMAGE", fmt="$FORMAT", **extra).drive_arg()
    assert args[args.index("-drive") + 1] == built


def test_an_empty_cdrom_drive() -> None:
    _, args = attach_args("cdrom")
    assert Attach(filename="", node="cd0", cdrom=True).drive_arg() == args[2]
    assert args[2] == "if=none,id=cd0,media=cdrom"


@pytest.mark.parametrize(
    ("read_only", "cache_direct", "extra"),
    [
        (False, False, {}),
        (True, False, {"read-only": True}),
        (False, True, {"cache": {"direct": True}}),
        (True, True, {"read-only": True, "cache": {"direct": True}}),
    ],
)
def test_blockdev_options_are_what_the_hotplug_scenarios_add(
    read_only: bool, cache_direct: bool, extra: dict[str, object]
) -> None:
    a = Attach(
        filename="$IMAGE",
        fmt="$FORMAT",
        kind=AttachKind.BLOCKDEV,
        read_only=read_only,
        cache_direct=cache_direct,
    )
    want = {
        "driver": "$FORMAT",
        "node-name": "drive0",
        "file": {"driver": "file", "filename": "$IMAGE"},
        **extra,
    }
    assert a.blockdev_options() == want
    assert list(a.blockdev_options()) == list(want)
    ctx = OpContext(attach="hotplug", read_only=read_only, cache_direct=cache_direct)
    assert add_args(ctx) == want
    assert a.argv() == ("-blockdev", json.dumps(want))


@pytest.mark.parametrize(
    "attach",
    [
        Attach(filename="/i/a.raw"),
        Attach(filename="/i/a,b.raw", fmt="raw", node="d1", read_only=True),
        Attach(filename="/i/a.qcow2", fmt="qcow2", cache_direct=True, snapshot=True),
        Attach(filename='json:{"driver":"raw"}', node="j"),
        Attach(filename="", node="cd0", cdrom=True),
    ],
)
def test_the_model_reads_back_what_the_builder_writes(attach: Attach) -> None:
    assert parse_drive(attach.drive_arg()) == attach


def test_the_legacy_readonly_spelling_is_read_only() -> None:
    a = parse_drive("file=fat:/i/tree,format=raw,readonly=on,if=none,id=disk0")
    assert a.read_only and a.filename == "fat:/i/tree" and a.node == "disk0"
    kept = Attach(filename="x", drive_extra=(("readonly", "on"),))
    assert kept.effective_read_only and not kept.read_only


def test_impossible_attachments_are_refused() -> None:
    with pytest.raises(CommandLineError, match="names its driver"):
        Attach(filename="/i/a", kind=AttachKind.BLOCKDEV)
    with pytest.raises(ValueError, match="no file name"):
        Attach(filename="")
    with pytest.raises(CommandLineError, match="do not exist for -blockdev"):
        Attach(filename="/i/a", fmt="raw", kind=AttachKind.BLOCKDEV, snapshot=True)
    with pytest.raises(CommandLineError, match="only file=NAME"):
        parse_drive("if=none,id=x")


def test_keyval_and_json_forms_of_an_option_tree() -> None:
    tree = {"driver": "qcow2", "file": {"driver": "file", "filename": "/a,b"}, "read-only": True}
    assert drive_keyval(tree) == "driver=qcow2,file.driver=file,file.filename=/a,,b,read-only=on"
    assert drive_keyval({"a": {}, "b": "x"}) == "b=x"
    assert json.loads(blockdev_json({"read-only": "on", "cache": {"direct": "off"}})) == {
        "read-only": True,
        "cache": {"direct": False},
    }
