"""Which tests start qemu-system, with which format, and what is left out."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.errors import IotestsError
from testbed.iotests.selection import Language, plan, read_test, scan_suite

BASH_QEMU = """#!/usr/bin/env bash
# group: rw auto quick
. ./common.rc
_supported_fmt qcow2 raw
$QEMU -drive file="$TEST_IMG" | _filter_qemu
"""

BASH_IMG_ONLY = """#!/usr/bin/env bash
# group: rw
# $QEMU is mentioned in a comment only
_supported_fmt generic
$QEMU_IMG create -f $IMGFMT "$TEST_IMG" 1M
$QEMU_IO -c "read 0 512" "$TEST_IMG"
"""

BASH_LAUNCH = """#!/usr/bin/env bash
# group: rw disabled
_supported_fmt qcow2
_launch_qemu -drive file=$TEST_IMG
"""

PY_VM = """#!/usr/bin/env python3
# group: rw
import iotests
class T(iotests.QMPTestCase):
    def setUp(self):
        self.vm = iotests.VM().add_drive(test_img)
iotests.main(supported_fmts=['qcow2',
                             'qed'])
"""

PY_PIPE_ONLY = """#!/usr/bin/env python3
# group: rw
import iotests
print(iotests.qemu_pipe('-machine', 'help'))
iotests.script_main(main, supported_fmts=['vvfat'])
"""


def write(d: Path, name: str, text: str) -> Path:
    p = d / name
    p.write_text(text)
    return p


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    write(tmp_path, "check", "#!/usr/bin/env python3\n")
    write(tmp_path, "001", BASH_QEMU)
    write(tmp_path, "001.out", "QA output created by 001\n")
    write(tmp_path, "002", BASH_IMG_ONLY)
    write(tmp_path, "003", BASH_LAUNCH)
    write(tmp_path, "004", PY_VM)
    (tmp_path / "tests").mkdir()
    write(tmp_path / "tests", "pipe-only", PY_PIPE_ONLY)
    write(tmp_path / "tests", "pipe-only.out", "")
    return tmp_path


def test_scan_reads_language_groups_formats_and_qemu(suite: Path) -> None:
    tests = {t.name: t for t in scan_suite(suite)}
    assert sorted(tests) == ["001", "002", "003", "004", "pipe-only"]
    assert tests["001"].starts_qemu and tests["001"].formats == ("qcow2", "raw")
    assert tests["001"].groups == {"rw", "auto", "quick"}
    assert not tests["002"].starts_qemu  # $QEMU_IMG, $QEMU_IO and a comment are not qemu-system
    assert tests["003"].starts_qemu
    assert tests["004"].language is Language.PYTHON and tests["004"].starts_qemu
    assert tests["004"].formats == ("qcow2", "qed")  # a list across lines
    assert not tests["pipe-only"].starts_qemu  # qemu_pipe only asks for help output


def test_generic_covers_image_formats_but_not_vvfat(suite: Path) -> None:
    t = read_test(suite / "002", "002")
    assert t.supports("qcow2") and t.supports("raw") and t.supports("vmdk")
    assert not t.supports("vvfat")


def test_plan_default_selection(suite: Path) -> None:
    runs, left = plan(scan_suite(suite), formats=("raw", "qcow2"), excluded={"004": "too slow"})
    assert [(r.test.name, r.format) for r in runs] == [("001", "raw")]  # raw preferred
    reasons = {x.name: x.reason for x in left}
    assert reasons["003"] == "in the suite's 'disabled' group"
    assert reasons["004"] == "too slow"
    assert "002" not in reasons  # does not start qemu-system: not part of the comparison


def test_plan_names_run_even_when_left_out_by_default(suite: Path) -> None:
    runs, left = plan(
        scan_suite(suite), formats=("qcow2",), names=["3", "4"], excluded={"004": "x"}
    )
    assert [(r.test.name, r.format) for r in runs] == [("003", "qcow2"), ("004", "qcow2")]
    assert left == []


def test_plan_unsupported_format_is_left_out_with_the_formats(suite: Path) -> None:
    runs, left = plan(scan_suite(suite), formats=("raw",), names=["pipe-only", "004"])
    assert runs == []
    assert {x.name: x.reason for x in left} == {
        "pipe-only": "supports only vvfat (asked, and in the build: raw)",
        "004": "supports only qcow2, qed (asked, and in the build: raw)",
    }


def test_plan_unknown_test_is_an_error(suite: Path) -> None:
    with pytest.raises(IotestsError, match="no such iotest: 999"):
        plan(scan_suite(suite), names=["999"])


def test_scan_refuses_a_directory_without_check(tmp_path: Path) -> None:
    with pytest.raises(IotestsError, match="no check script"):
        scan_suite(tmp_path)
