"""Drivers declare their children; the core opens them without naming a format (no QEMU)."""

from __future__ import annotations

import pytest

from testbed.block import formats
from testbed.block.driver import ChildRole, MemFile
from testbed.block.formats.qcow2 import DATA_FILE
from testbed.block.formats.raw import RawDriver
from testbed.block.formats.vmdk import FLAT_EXTENT, SPARSE_EXTENT, VmdkDriver
from testbed.block.layer import BlockLayer, OpenOptions, _ChildOpener
from testbed.block.opener import Opener
from testbed.errors import BlockUsageError


def test_each_driver_declares_the_children_it_opens() -> None:
    assert VmdkDriver.children == (SPARSE_EXTENT, FLAT_EXTENT)
    assert SPARSE_EXTENT.role is ChildRole.METADATA and FLAT_EXTENT.role is ChildRole.DATA
    assert formats.get_driver("qcow2").children == (DATA_FILE,)
    assert DATA_FILE.role is ChildRole.DATA and not DATA_FILE.relative_to_parent
    assert RawDriver.children == ()


def test_a_child_its_driver_does_not_declare_is_a_bug() -> None:
    opts = OpenOptions(read_only=True, auto_read_only=False, cache_direct=False)
    ctx = _ChildOpener(BlockLayer(opener=Opener(None)), opts, RawDriver)
    with pytest.raises(BlockUsageError, match="raw driver opened a 'data-file' child"):
        ctx.open_file("x", child=DATA_FILE, relative_to=MemFile(b""))


def test_job_targets_come_from_the_drivers_that_create_them() -> None:
    creators = {n for n, d in formats.all_drivers().items() if d.creates_targets}
    assert creators == {"qcow2", "raw"}
    assert [n for n, d in formats.all_drivers().items() if d.bare] == [formats.BYTES_FORMAT]
