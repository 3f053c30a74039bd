"""Every QEMU transport starts a QEMU on a chain, and the chain is all there.

Needs the patched QEMU (make qemu) and qemu-img.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.bench.chain import make_chain
from testbed.bench.env import Env
from testbed.bench.qemurun import started, storm
from testbed.bench.qemus import versions
from testbed.bench.runner import derive_floor, make_file
from testbed.bench.transports import TRANSPORTS, Services
from testbed.pytest_plugin import require

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

VERSION = "7.2"  # the storm's; every transport is opened on every registered version


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    require(shutil.which("qemu-img") is not None, "qemu-img (qemu-utils)")
    env = Env(work_dir=tmp_path, file=make_file(tmp_path / "files"), warmup=0, qemu_version="7.2")
    root = (tmp_path / "qemu").resolve()
    root.mkdir()
    s = Services(env, root)
    yield s
    s.close()


def test_a_chain_is_made_with_relative_backing_names(services: Services) -> None:
    chain = make_chain(services.root / "chains", 3)
    assert [p.name for p in chain.layers] == ["l2.qcow2", "l1.qcow2", "l0.qcow2"]
    assert b"l1.qcow2" in chain.top.read_bytes()[:4096]
    assert make_chain(services.root / "chains", 3) == chain  # made once


CHAIN_TRANSPORTS = [t.name for t in TRANSPORTS if t.experiments is None]


@pytest.mark.parametrize("version", versions())
@pytest.mark.parametrize("name", CHAIN_TRANSPORTS)
def test_each_transport_opens_the_whole_chain(services: Services, name: str, version: str) -> None:
    transport = TRANSPORTS.get(name)
    why = transport.unavailable(version)
    require(why is None, str(why))
    chain = make_chain(services.root / "chains", 3)
    later = services.root / "later.img"
    later.write_bytes(bytes(4096))

    async def go() -> tuple[int, float, str]:
        launch = transport.launch(services, chain, [later], version=version)
        async with started(transport.binary(version), launch) as q:
            nodes = await q.execute("query-named-block-nodes", {"flat": True})
            node = {"driver": "file", "filename": launch.name(later), "node-name": "x",
                    "read-only": True}  # fmt: skip
            await q.execute("blockdev-add", node)
            files = {n["file"] for n in nodes if n["drv"] == "qcow2"}
            return len(files), q.greeting_s, launch.name(later)

    count, greeting, name_later = asyncio.run(go())
    assert count == 3 and 0 < greeting < 60
    assert name_later.startswith("/dev/fdset/") == (name == "fdset")


@pytest.mark.parametrize("version", versions())
def test_the_floor_serves_a_hooked_blockdev_add(tmp_path: Path, version: str) -> None:
    """hook_floor (blockdev only): QEMU's read-only open answered by the Python floor."""
    transport = TRANSPORTS.get("hook_floor")
    require(transport.unavailable(version) is None, str(transport.unavailable(version)))
    require(shutil.which("strace") is not None, "strace (the floor's program is traced)")
    file = make_file(tmp_path / "files")
    root = (tmp_path / "qemu").resolve()
    later = root / "later.img"
    root.mkdir()
    later.write_bytes(b"floor" + bytes(4091))
    env = Env(work_dir=tmp_path, file=file, warmup=0, qemu_version=version,
              floor_program=derive_floor(file).program)  # fmt: skip
    services = Services(env, root)
    assert transport.unavailable_in(services) is None
    bare = Services(dataclasses.replace(env, floor_program=None), root)
    assert "no program" in str(transport.unavailable_in(bare))

    async def go() -> list[str]:
        launch = transport.launch(services, None, [later], version=version)
        async with started(transport.binary(version), launch) as q:
            node = {"driver": "file", "filename": str(later), "node-name": "x", "read-only": True}
            await q.execute("blockdev-add", node)
            fds = Path(f"/proc/{q.spawned.proc.pid}/fd")
            return [os.readlink(fd) for fd in fds.iterdir()]

    try:
        # every open of a hooked QEMU is the hook's: the floor answered this one
        assert str(later) in asyncio.run(go())
    finally:
        services.close()
    assert "blockdev" in (transport.experiments or ())


@pytest.mark.parametrize("name", ["path", "hook", "hook_c"])
def test_the_cpu_pass_charges_each_add_to_qemu_and_to_its_own_server(
    services: Services, name: str
) -> None:
    """blockdev's CPU pass: QEMU's CPU per add always, the server's only where the
    transport has one, and that server's CPU grows with the opens it serves."""
    from testbed.bench.experiments.blockdev import add_del_cpu, bench_file

    transport = TRANSPORTS.get(name)
    require(transport.unavailable(VERSION) is None, str(transport.unavailable(VERSION)))
    file = bench_file(services.root)

    async def go() -> list[dict[str, float]]:
        launch = transport.launch(services, None, [file], version=VERSION)
        async with started(transport.binary(VERSION), launch) as q:
            op = add_del_cpu(q, launch, file)
            return [await op() for _ in range(5)]

    figures = asyncio.run(go())
    assert all(f["ms"] > 0 and f["qemu_cpu_us_per_op"] > 0 for f in figures)
    if name == "path":
        assert not any("server_cpu_us_per_op" in f for f in figures)
    else:
        # one open per add: the server worked on every one
        assert all(f["server_cpu_us_per_op"] > 0 for f in figures)


def test_a_storm_waits_for_every_greeting(services: Services) -> None:
    path = TRANSPORTS.get("hook")
    require(path.unavailable(VERSION) is None, "the patched QEMU")
    chains = [make_chain(services.root / f"vm{i}", 2) for i in range(3)]
    launches = [path.launch(services, c, version=VERSION) for c in chains]
    seconds = asyncio.run(storm(path.binary(VERSION), launches))
    assert 0 < seconds < 60
