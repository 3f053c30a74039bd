"""A short subset of QEMU's own iotests, unhooked and hooked: the same results.

The whole selection runs with ``make iotests`` (minutes); these few cover
bash and Python tests, backing chains, snapshots, locking, blkdebug and
NBD exports, each in a few seconds.  A test here must pass unhooked *and*
hooked, the hooked run must have sent its opens to the broker, and no
broker may outlive its QEMU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.errors import IotestsError
from testbed.iotests.builds import find_builds, suite_tools
from testbed.iotests.modes import Mode
from testbed.iotests.results import Status
from testbed.iotests.runner import RunConfig, lay_out, prepare_wrappers, run_one
from testbed.iotests.selection import Planned, scan_suite
from testbed.pytest_plugin import missing, require

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

#: (test, format): quick ones, passing unhooked and hooked on 7.2 (docs/iotests.md).
SUBSET = [
    ("071", "qcow2"),  # blkdebug / blkverify: several files per drive
    ("130", "qcow2"),  # backing files and commit
    ("157", "qcow2"),  # -drive cache options: O_DIRECT reopens
    ("182", "qcow2"),  # image locking across two QEMUs
    ("195", "qcow2"),  # snapshot changing backing files
    ("099", "qcow2"),  # json: filenames, blkverify, blkdebug config files
    ("132", "qcow2"),  # Python: a mirror job over QMP
    ("208", "qcow2"),  # Python: drive-mirror to a new image, then quit
]


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, dict[Mode, Path]]:
    builds = find_builds()
    require(bool(builds), "the patched QEMU build (make qemu)")
    build = builds[0]
    require(
        build.iotests_source.is_dir(),
        f"QEMU {build.version}'s source tree with tests/qemu-iotests "
        f"({build.iotests_source}; scripts/build-qemu.sh --fetch-only)",
    )
    try:
        tools = suite_tools(build)
        layout = lay_out(build, tmp_path_factory.mktemp("iotests"))
    except IotestsError as err:
        missing(str(err))
    cfg = RunConfig(build=build, tools=tools, layout=layout, stock=None, timeout=180, retries=1)
    return cfg, prepare_wrappers(cfg, [Mode.UNHOOKED, Mode.HOOKED])


@pytest.mark.parametrize(("name", "fmt"), SUBSET, ids=[n for n, _ in SUBSET])
def test_hooked_equals_unhooked(
    suite: tuple[RunConfig, dict[Mode, Path]], name: str, fmt: str
) -> None:
    cfg, wrappers = suite
    tests = {t.name: t for t in scan_suite(cfg.layout.iotests)}
    planned = Planned(tests[name], fmt)
    plain = run_one(cfg, Mode.UNHOOKED, wrappers[Mode.UNHOOKED], planned)
    if plain.status is Status.FAIL:  # one retry, as `testbed iotests` does: shared cores
        plain = run_one(cfg, Mode.UNHOOKED, wrappers[Mode.UNHOOKED], planned)
    assert plain.status is Status.PASS, f"unhooked {name}: {plain.reason}\n" + "\n".join(plain.diff)
    assert plain.launches >= 2 and plain.requests == 0
    hooked = run_one(cfg, Mode.HOOKED, wrappers[Mode.HOOKED], planned)
    if hooked.status is Status.FAIL:
        hooked = run_one(cfg, Mode.HOOKED, wrappers[Mode.HOOKED], planned)
    assert hooked.status is Status.PASS, f"hooked {name}: {hooked.reason}\n" + "\n".join(
        hooked.diff
    )
    assert hooked.launches == plain.launches
    assert hooked.requests > 0, "the hooked QEMUs sent no opens to the broker"
    assert hooked.brokers_left == 0
