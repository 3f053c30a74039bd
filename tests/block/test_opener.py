"""qemu_open of the model: O_CLOEXEC, the O_DIRECT EINVAL retry, the broker's errno,
relative names sent joined to the working directory."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.block.layer import BlockLayer
from testbed.block.opener import Opener, hook_name
from testbed.broker import Broker, Policy
from testbed.transport import HookClient


def test_local_open_adds_cloexec_and_records(tmp_path: Path) -> None:
    f = tmp_path / "a.raw"
    f.write_bytes(b"x" * 512)
    opener = Opener()
    fd = opener.qemu_open(str(f), os.O_RDONLY)
    try:
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)
    [ev] = opener.trace
    assert ev.path == str(f)
    assert ev.flags == os.O_RDONLY | os.O_CLOEXEC
    assert ev.flag_names == ("O_RDONLY", "O_CLOEXEC")
    assert ev.result == 0


def test_failed_open_is_traced_with_errno_and_names_file(tmp_path: Path) -> None:
    opener = Opener()
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as info:
        opener.qemu_open(missing, os.O_RDWR)
    assert info.value.filename == missing
    assert opener.trace[-1].result == -errno.ENOENT


def test_create_passes_mode(tmp_path: Path) -> None:
    opener = Opener()
    fd = opener.qemu_create(str(tmp_path / "new"), os.O_RDWR, 0o644)
    os.close(fd)
    assert opener.trace[-1].flags & os.O_CREAT
    assert opener.trace[-1].mode == 0o644


def test_o_direct_einval_is_retried_only_to_word_the_error(tmp_path: Path) -> None:
    path = str(tmp_path / "f")
    Path(path).write_bytes(b"")
    calls: list[int] = []

    def no_direct(p: str, flags: int, mode: int) -> int:
        calls.append(flags)
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", p)
        return os.open(p, flags, mode)

    opener = Opener(raw_open=no_direct)
    with pytest.raises(OSError) as info:
        opener.qemu_open(path, os.O_RDONLY | os.O_DIRECT)
    assert info.value.errno == errno.EINVAL
    assert "O_DIRECT" in str(info.value)
    assert [bool(f & os.O_DIRECT) for f in calls] == [True, False]
    assert [ev.result for ev in opener.trace] == [-errno.EINVAL, 0]


def test_einval_without_o_direct_is_not_retried(tmp_path: Path) -> None:
    def einval(p: str, flags: int, mode: int) -> int:
        raise OSError(errno.EINVAL, "Invalid argument", p)

    opener = Opener(raw_open=einval)
    with pytest.raises(OSError):
        opener.qemu_open(str(tmp_path / "f"), os.O_RDONLY)
    assert len(opener.trace) == 1


@pytest.fixture
def ro_broker(tmp_path: Path) -> Iterator[HookClient]:
    ours, theirs = socket.socketpair()
    broker = Broker(Policy.from_grants(ro=[str(tmp_path)]))
    broker.add_connection(ours)
    with broker, HookClient(theirs) as client:
        yield client


def test_broker_refusal_surfaces_as_eacces_naming_the_file(
    tmp_path: Path, ro_broker: HookClient
) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    layer = BlockLayer(ro_broker)
    # -blockdev opens O_RDWR at once: a read-only grant refuses it.
    with pytest.raises(PermissionError) as info:
        layer.blockdev_add(driver="raw", node_name="d0", filename=str(image))
    assert info.value.errno == errno.EACCES
    assert info.value.filename == str(image)
    # read-only opens pass, and the trace shows both answers.
    layer.drive_add(filename=str(image), fmt="raw", drive_id="d1", read_only=True)
    assert layer.read("d1", 0, 512) == bytes(512)
    layer.quit()
    assert [ev.result for ev in layer.trace] == [-errno.EACCES, 0, 0]


def test_hook_name_joins_relative_names_without_normalising() -> None:
    assert hook_name("disk.raw", "/srv/vm") == "/srv/vm/disk.raw"
    assert hook_name("../x", "/srv/vm") == "/srv/vm/../x"
    assert hook_name("fat:16:/srv/tree", "/srv/vm") == "/srv/vm/fat:16:/srv/tree"
    assert hook_name("x", "/") == "/x"
    assert hook_name("/abs/x", "/srv/vm") == "/abs/x"
    assert hook_name("", "/srv/vm") == ""


def test_relative_name_reaches_the_broker_absolute_and_opens(
    tmp_path: Path, ro_broker: HookClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "disk.raw").write_bytes(bytes(4096))
    monkeypatch.chdir(tmp_path)
    opener = Opener(ro_broker)
    os.close(opener.qemu_open("disk.raw", os.O_RDONLY))
    assert [(ev.path, ev.result) for ev in opener.trace] == [(f"{tmp_path}/disk.raw", 0)]


def test_missing_relative_name_is_enoent_naming_it_as_given(
    tmp_path: Path, ro_broker: HookClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # qemu-iotests 051: file.filename=foo:bar, where the hook used to say EACCES
    monkeypatch.chdir(tmp_path)
    opener = Opener(ro_broker)
    with pytest.raises(FileNotFoundError) as info:
        opener.qemu_open("foo:bar", os.O_RDONLY)
    assert info.value.filename == "foo:bar"
    assert opener.trace[-1].path == f"{tmp_path}/foo:bar"


def test_local_open_keeps_relative_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "disk.raw").write_bytes(bytes(512))
    monkeypatch.chdir(tmp_path)
    opener = Opener()  # stock QEMU: open(2) gets the name as given
    os.close(opener.qemu_open("disk.raw", os.O_RDONLY))
    assert opener.trace[-1].path == "disk.raw"


def test_no_working_directory_sends_no_request(
    tmp_path: Path, ro_broker: HookClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    opener = Opener(ro_broker)
    with pytest.raises(FileNotFoundError) as info:
        opener.qemu_open("disk.raw", os.O_RDONLY)
    assert info.value.filename == "disk.raw"
    assert opener.trace == []
