# ruff: noqa: E501 - the scenario table reads best one scenario per line
"""Jobs, reopen, media, -snapshot, node references, json: names: the model opens what stock QEMU 7.2 opens.

Each case runs on Debian's QEMU under strace and on the model
(:class:`testbed.block.monitor.ModelMachine`) from the same command line
and QMP steps; the normalised traces must be equal open for open, and each
step must work (or fail) on both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from jobs_oracle import CHAIN3, Step, make_dir, run_model, run_stock

from testbed.pytest_plugin import require
from testbed.qemu import STOCK_QEMU

pytestmark = [pytest.mark.stock_qemu, pytest.mark.slow]

DEV = [
    "-S",
    "-drive",
    "file=$D/top.qcow2,format=qcow2,if=none,id=drive0",
    "-device",
    "virtio-blk-pci,drive=drive0",
]
NODEV = ["-drive", "file=$D/top.qcow2,format=qcow2,if=none,id=drive0"]
BLOCKDEV = [
    "-blockdev",
    '{"driver":"qcow2","node-name":"drive0","file":{"driver":"file","filename":"$D/top.qcow2"}}',
]
RO_FILE = [
    "-blockdev",
    "driver=file,node-name=f0,filename=$D/base.raw,read-only=on",
    "-blockdev",
    "driver=raw,node-name=n0,file=f0,read-only=on",
]
CDROM = ["-S", "-drive", "if=none,id=cd0,media=cdrom", "-device", "ide-cd,drive=cd0,id=cdrom0"]
TARGET = ("qemu-img create -q -f qcow2 tgt.qcow2 4M",)


def ready_complete(job: str = "job0") -> list[Step]:
    return [
        ("wait", "BLOCK_JOB_READY", job),
        ("qmp", "block-job-complete", {"device": job}),
        ("wait", "BLOCK_JOB_COMPLETED", job),
    ]


def completed(job: str = "job0") -> list[Step]:
    return [("wait", "BLOCK_JOB_COMPLETED", job)]


def add_target(name: str = "tgt") -> Step:
    return (
        "qmp",
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": name,
            "file": {"driver": "file", "filename": "$D/tgt.qcow2"},
        },
    )


@dataclass(frozen=True)
class Case:
    name: str
    args: list[str]
    steps: list[Step]
    machine: str = "pc"
    recipe: tuple[str, ...] = CHAIN3


def commit(**kw: Any) -> Step:
    return ("qmp", "block-commit", {"device": "drive0", "job-id": "job0", **kw})


def copy(command: str, target: str, sync: str, **kw: Any) -> Step:
    """drive-mirror/drive-backup to a new qcow2 ``$D/TARGET``, blockdev-* to node ``TARGET``."""
    to = {"target": f"$D/{target}", "format": "qcow2"} if command.startswith("drive-") else {}
    args = {"device": "drive0", "job-id": "job0", "target": target, **to, "sync": sync, **kw}
    return ("qmp", command, args)


def mirror(sync: str, **kw: Any) -> Step:
    return copy("drive-mirror", "mirror.qcow2", sync, **kw)


CASES = [
    Case(
        "commit-intermediate", DEV, [commit(top="$D/mid.qcow2", base="$D/base.raw"), *completed()]
    ),
    Case(
        "commit-intermediate-backing-file",
        DEV,
        [
            commit(top="$D/mid.qcow2", base="$D/base.raw", **{"backing-file": "base.raw"}),
            *completed(),
        ],
    ),
    Case(
        "commit-intermediate-nodevice",
        NODEV,
        [commit(top="$D/mid.qcow2"), *completed()],
        machine="none",
    ),
    Case("commit-active", DEV, [commit(), *ready_complete()]),
    Case("commit-active-into-mid", DEV, [commit(base="$D/mid.qcow2"), *ready_complete()]),
    Case("commit-active-blockdev", BLOCKDEV, [commit(), *ready_complete()], machine="none"),
    Case(
        "stream",
        DEV,
        [("qmp", "block-stream", {"device": "drive0", "job-id": "job0"}), *completed()],
    ),
    Case(
        "stream-base",
        DEV,
        [
            ("qmp", "block-stream", {"device": "drive0", "job-id": "job0", "base": "$D/base.raw"}),
            *completed(),
        ],
    ),
    Case("mirror-full", DEV, [mirror("full"), *ready_complete()]),
    Case("mirror-top", DEV, [mirror("top"), *ready_complete()]),
    Case("mirror-none", DEV, [mirror("none"), *ready_complete()]),
    Case(
        "mirror-cancel",
        DEV,
        [
            mirror("full"),
            ("wait", "BLOCK_JOB_READY", "job0"),
            ("qmp", "block-job-cancel", {"device": "job0"}),
            *completed(),
        ],
    ),
    Case("mirror-blockdev-source", BLOCKDEV, [mirror("full"), *ready_complete()], machine="none"),
    Case(
        "blockdev-mirror",
        DEV,
        [add_target(), copy("blockdev-mirror", "tgt", "full"), *ready_complete()],
        recipe=CHAIN3 + TARGET,
    ),
    Case("drive-backup", DEV, [copy("drive-backup", "backup.qcow2", "full"), *completed()]),
    Case("drive-backup-top", DEV, [copy("drive-backup", "backup.qcow2", "top"), *completed()]),
    Case(
        "blockdev-backup",
        DEV,
        [add_target(), copy("blockdev-backup", "tgt", "full"), *completed()],
        recipe=CHAIN3 + TARGET,
    ),
    Case(
        "reopen-rw-ro",
        RO_FILE,
        [
            (
                "qmp",
                "blockdev-reopen",
                {
                    "options": [
                        {
                            "driver": "file",
                            "node-name": "f0",
                            "filename": "$D/base.raw",
                            "read-only": False,
                        },
                        {"driver": "raw", "node-name": "n0", "file": "f0", "read-only": False},
                    ]
                },
            ),
            (
                "qmp",
                "blockdev-reopen",
                {
                    "options": [
                        {"driver": "raw", "node-name": "n0", "file": "f0", "read-only": True},
                        {
                            "driver": "file",
                            "node-name": "f0",
                            "filename": "$D/base.raw",
                            "read-only": True,
                        },
                    ]
                },
            ),
        ],
        machine="none",
    ),
    Case(
        "reopen-cache-direct",
        RO_FILE,
        [
            (
                "qmp",
                "blockdev-reopen",
                {
                    "options": [
                        {
                            "driver": "file",
                            "node-name": "f0",
                            "filename": "$D/base.raw",
                            "read-only": True,
                            "cache": {"direct": True},
                        }
                    ]
                },
            ),
            (
                "qmp",
                "blockdev-reopen",
                {
                    "options": [
                        {
                            "driver": "file",
                            "node-name": "f0",
                            "filename": "$D/base.raw",
                            "read-only": True,
                        }
                    ]
                },
            ),
        ],
        machine="none",
    ),
    Case(
        "cdrom",
        CDROM,
        [
            (
                "qmp",
                "blockdev-change-medium",
                {"id": "cdrom0", "filename": "$D/base.raw", "format": "raw"},
            ),
            ("qmp", "eject", {"id": "cdrom0"}),
            ("qmp", "blockdev-open-tray", {"id": "cdrom0"}),
            ("qmp", "blockdev-close-tray", {"id": "cdrom0"}),
            (
                "qmp",
                "blockdev-change-medium",
                {"id": "cdrom0", "filename": "$D/top.qcow2", "format": "qcow2"},
            ),
            ("qmp", "blockdev-open-tray", {"id": "cdrom0", "force": True}),
            ("qmp", "blockdev-remove-medium", {"id": "cdrom0"}),
            ("qmp", "blockdev-close-tray", {"id": "cdrom0"}),
        ],
    ),
    Case(
        "cdrom-change-twice",
        CDROM,
        [
            ("qmp", "blockdev-change-medium", {"id": "cdrom0", "filename": "$D/top.qcow2"}),
            (
                "qmp",
                "blockdev-change-medium",
                {"id": "cdrom0", "filename": "$D/base.raw", "format": "raw"},
            ),
        ],
    ),
    Case(
        "drive-snapshot-on",
        [
            "-S",
            "-drive",
            "file=$D/top.qcow2,format=qcow2,if=none,id=drive0,snapshot=on",
            "-device",
            "virtio-blk-pci,drive=drive0",
        ],
        [],
    ),
    Case(
        "global-snapshot",
        [
            "-S",
            "-snapshot",
            "-drive",
            "file=$D/top.qcow2,format=qcow2,if=none,id=drive0",
            "-device",
            "virtio-blk-pci,drive=drive0",
        ],
        [],
    ),
    Case(
        "node-references",
        [],
        [
            (
                "qmp",
                "blockdev-add",
                {"driver": "file", "node-name": "fb", "filename": "$D/base.raw"},
            ),
            ("qmp", "blockdev-add", {"driver": "raw", "node-name": "nb", "file": "fb"}),
            (
                "qmp",
                "blockdev-add",
                {"driver": "file", "node-name": "fm", "filename": "$D/mid.qcow2"},
            ),
            (
                "qmp",
                "blockdev-add",
                {"driver": "qcow2", "node-name": "nm", "file": "fm", "backing": "nb"},
            ),
            (
                "qmp",
                "blockdev-add",
                {"driver": "file", "node-name": "ft", "filename": "$D/top.qcow2"},
            ),
            (
                "qmp",
                "blockdev-add",
                {"driver": "qcow2", "node-name": "nt", "file": "ft", "backing": "nm"},
            ),
            ("qmp", "blockdev-del", {"node-name": "nt"}),
            ("qmp", "blockdev-del", {"node-name": "ft"}),
        ],
        machine="none",
    ),
    Case(
        "node-reference-lock-conflict",
        [],
        [
            (
                "qmp",
                "blockdev-add",
                {"driver": "file", "node-name": "fm", "filename": "$D/mid.qcow2"},
            ),
            (
                "qmp",
                "blockdev-add",
                {"driver": "file", "node-name": "ft", "filename": "$D/top.qcow2"},
            ),
            ("qmp", "blockdev-add", {"driver": "qcow2", "node-name": "nt", "file": "ft"}),
        ],
        machine="none",
    ),
    Case(
        "json-filename",
        [
            "-S",
            "-drive",
            'file=json:{"driver":"qcow2",,"file":{"driver":"file",,"filename":"$D/top.qcow2"}},if=none,id=drive0',
            "-device",
            "virtio-blk-pci,drive=drive0",
        ],
        [],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_model_opens_what_stock_qemu_opens(case: Case, tmp_path: Path) -> None:
    require(STOCK_QEMU.exists(), f"Debian's QEMU {STOCK_QEMU}")
    stock_dir, model_dir = tmp_path / "s", tmp_path / "m"
    make_dir(stock_dir, case.recipe)
    make_dir(model_dir, case.recipe)
    stock, stock_ok = run_stock(stock_dir, case.args, case.steps, machine=case.machine)
    model, model_ok = run_model(model_dir, case.args, case.steps)
    assert model == stock
    assert model_ok == stock_ok
