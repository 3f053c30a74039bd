"""A short subset of QEMU's own iotests in every mode, on every built version.

The whole selection runs with ``make iotests`` (an hour); these few cover
bash and Python tests, backing chains, snapshots, locking, blkdebug and
NBD exports, each in a few seconds.  A test here must pass unhooked,
hooked *and* supervised (an unpatched QEMU under ``testbed supervise``),
the hooked and supervised runs must have sent their opens to the broker or
the supervisor, and no broker may outlive its QEMU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.errors import IotestsError
from testbed.iotests.builds import QemuBuild, find_builds, stock_emulator, suite_tools
from testbed.iotests.modes import Mode
from testbed.iotests.results import Status, TestRun
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
    ("vvfat", "vvfat"),  # Python: vvfat scans its directory through the hook (patch 0008)
]


def _builds() -> list[QemuBuild]:
    try:
        return find_builds()
    except IotestsError:
        return []


def _version_ids() -> list[str]:
    return [f"qemu{b.version}" for b in _builds()] or ["no-build"]


@pytest.fixture(scope="module", params=_version_ids())
def suite(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[RunConfig, dict[Mode, Path]]:
    builds = {f"qemu{b.version}": b for b in _builds()}
    require(request.param in builds, "the patched QEMU build (make qemu)")
    build = builds[request.param]
    require(
        build.iotests_source.is_dir(),
        f"QEMU {build.version}'s source tree with tests/qemu-iotests "
        f"({build.iotests_source}; scripts/build-qemu.sh --fetch-only)",
    )
    stock = stock_emulator(build)
    require(stock is not None, f"an unpatched qemu-system for QEMU {build.version} (make qemu)")
    try:
        tools = suite_tools(build)
        layout = lay_out(build, tmp_path_factory.mktemp(f"iotests-{build.version}"))
    except IotestsError as err:
        missing(str(err))
    cfg = RunConfig(build=build, tools=tools, layout=layout, stock=stock, timeout=180, retries=1)
    return cfg, prepare_wrappers(cfg, list(Mode))


def _run(cfg: RunConfig, mode: Mode, wrapper: Path, planned: Planned) -> TestRun:
    run = run_one(cfg, mode, wrapper, planned)
    if run.status is Status.FAIL:  # one retry, as `testbed iotests` does: shared cores
        run = run_one(cfg, mode, wrapper, planned)
    assert run.status is Status.PASS, f"{mode} {planned.test.name}: {run.reason}\n" + "\n".join(
        run.diff
    )
    return run


@pytest.mark.parametrize(("name", "fmt"), SUBSET, ids=[n for n, _ in SUBSET])
def test_every_mode_passes(suite: tuple[RunConfig, dict[Mode, Path]], name: str, fmt: str) -> None:
    cfg, wrappers = suite
    tests = {t.name: t for t in scan_suite(cfg.layout.iotests)}
    planned = Planned(tests[name], fmt)
    plain = _run(cfg, Mode.UNHOOKED, wrappers[Mode.UNHOOKED], planned)
    assert plain.launches >= 2 and plain.requests == 0
    hooked = _run(cfg, Mode.HOOKED, wrappers[Mode.HOOKED], planned)
    assert hooked.launches == plain.launches
    assert hooked.requests > 0, "the hooked QEMUs sent no opens to the broker"
    assert hooked.brokers_left == 0
    supervised = _run(cfg, Mode.SUPERVISED, wrappers[Mode.SUPERVISED], planned)
    assert supervised.launches == plain.launches
    # every open of the supervised QEMU is served, libraries included: more than hooked
    assert supervised.requests > hooked.requests, "the supervisor served too few opens"
