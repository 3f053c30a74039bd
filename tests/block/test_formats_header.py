"""The on-disk headers declared once: offsets derived from the declarations match the specs."""

from __future__ import annotations

import pytest

from testbed.block.formats import qcow2, vdi, vmdk_layout, vpc
from testbed.block.formats.header import HeaderLayout
from testbed.errors import BlockUsageError, CorruptImageError

# Offsets as the specifications print them (qcow2.txt, QEMU's vmdk.c/vdi.c, the VHD spec).
SPEC_OFFSETS = [
    (qcow2._HEADER_V2, {"magic": 0, "version": 4, "backing_file_offset": 8,
                        "backing_file_size": 16, "cluster_bits": 20, "size": 24,
                        "crypt_method": 32, "l1_size": 36, "l1_table_offset": 40,
                        "refcount_table_offset": 48, "refcount_table_clusters": 56,
                        "nb_snapshots": 60, "snapshots_offset": 64}),
    (qcow2._HEADER_V3, {"incompatible_features": 72, "compatible_features": 80,
                        "autoclear_features": 88, "refcount_order": 96, "header_length": 100}),
    (qcow2._HEADER_COMPRESSION, {"compression_type": 104}),
    (vmdk_layout.VMDK4, {"version": 4, "flags": 8, "capacity": 12, "granularity": 20,
                         "desc_offset": 28, "desc_size": 36, "num_gtes_per_gt": 44,
                         "rgd_offset": 48, "gd_offset": 56, "grain_offset": 64, "filler": 72,
                         "check_bytes": 73, "compress_algorithm": 77}),
    (vmdk_layout.VMDK3, {"version": 4, "flags": 8, "disk_sectors": 12, "granularity": 16,
                         "l1dir_offset": 20, "l1dir_size": 24, "file_sectors": 28,
                         "cylinders": 32, "heads": 36, "sectors_per_track": 40}),
    (vdi._HEADER, {"signature": 64, "version": 68, "header_size": 72, "image_type": 76,
                   "image_flags": 80, "description": 84, "offset_bmap": 340,
                   "offset_data": 344, "sector_size": 360, "disk_size": 368, "block_size": 376,
                   "blocks_in_image": 384, "uuid_link": 424, "uuid_parent": 440}),
    (vpc._FOOTER, {"cookie": 0, "data_offset": 16, "creator_app": 28, "current_size": 48,
                   "cylinders": 56, "heads": 58, "sectors_per_track": 59, "disk_type": 60,
                   "checksum": 64, "uuid": 68, "saved_state": 84}),
    (vpc._DYNAMIC, {"cookie": 0, "data_offset": 8, "table_offset": 16, "header_version": 24,
                    "max_table_entries": 28, "block_size": 32, "checksum": 36}),
]  # fmt: skip


@pytest.mark.parametrize(("layout", "spec"), SPEC_OFFSETS, ids=lambda v: getattr(v, "fmt", ""))
def test_declared_offsets_match_the_spec(layout: HeaderLayout, spec: dict[str, int]) -> None:
    assert {name: layout.offset(name) for name in spec} == spec


def test_sizes_match_the_structs_they_replaced() -> None:
    assert (qcow2.V2_HEADER_LENGTH, qcow2.V3_HEADER_LENGTH) == (72, 104)
    assert (vmdk_layout.VMDK4_HEADER_SIZE, vmdk_layout.VMDK3_HEADER_SIZE) == (79, 44)
    assert vdi.HEADER_SIZE == 512
    assert (vpc._FOOTER.size, vpc._DYNAMIC.size) == (85, 40)


def test_corrupt_names_the_field_at_its_offset() -> None:
    layout = HeaderLayout("demo", ">", (("magic", "4s"), ("size", "Q"), ("flags", "I")), start=8)
    err = layout.corrupt("flags", "bad flags")
    assert isinstance(err, CorruptImageError)
    assert (err.format, err.field, err.offset) == ("demo", "flags", 20)
    # a copy of the header elsewhere in the file (a footer): same field, shifted
    moved = layout.corrupt("flags", "bad flags", at=1000, field="footer flags")
    assert (moved.field, moved.offset) == ("footer flags", 1012)
    assert layout.unpack_dict(bytes(8) + b"ABCD" + (5).to_bytes(8, "big") + bytes(4)) == {
        "magic": b"ABCD",
        "size": 5,
        "flags": 0,
    }


def test_a_field_declared_twice_is_refused() -> None:
    with pytest.raises(BlockUsageError, match="declared twice"):
        HeaderLayout("demo", "<", (("a", "I"), ("a", "I")))
