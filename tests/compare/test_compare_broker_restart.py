"""The broker-restart operation: broker steps, broker_down steps, and the oracles that run them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from testbed.compare.compare import Status
from testbed.compare.ops import OpContext, get
from testbed.compare.run import run_scenario
from testbed.compare.runners import model
from testbed.compare.runners.brokers import broker_step
from testbed.compare.runners.images import load_index
from testbed.compare.runners.setup import Binaries, prepare
from testbed.compare.scenario_file import dump, load
from testbed.compare.scenarios import Scenario, build_matrix
from testbed.compare.steps import QUIT, BrokerAction, Step, StepKind, broker, broker_down, qmp
from testbed.errors import ScenarioFileError
from testbed.pytest_plugin import require
from testbed.qemu import STOCK_QEMU
from testbed.qemu.binaries import REPO_ROOT, is_runnable, patched_qemu_path

INDEX = REPO_ROOT / "build" / "images" / "index.json"
NOWHERE = Binaries(patched=Path("/nonexistent/qemu"), stock=Path("/nonexistent/qemu"))


class _Control:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.down_errors: list[tuple[str, str]] = []

    def kill(self) -> None:
        self.calls.append("kill")

    def restart(self) -> None:
        self.calls.append("restart")


def test_steps_are_checked_and_labelled() -> None:
    with pytest.raises(ValueError, match="kill, restart"):
        broker("pause")
    with pytest.raises(ValueError, match="qmp or hmp only"):
        Step(kind=StepKind.QUIT, broker_down=True)
    down = broker_down(qmp("blockdev-snapshot-sync", device="drive0"))
    assert down.label == "blockdev-snapshot-sync (broker down)"
    assert broker(BrokerAction.KILL).label == "broker kill"
    assert down.to_json()["broker_down"] is True


def test_broker_step_without_a_broker_runs_nothing() -> None:
    ran: list[Step] = []

    def run(s: Step) -> str:
        ran.append(s)
        return "ok"

    down = broker_down(qmp("blockdev-snapshot-sync"))
    for step in (broker("kill"), down, broker("restart")):
        assert broker_step(None, step, run) == "ok"
    assert ran == []
    assert broker_step(None, qmp("query-block"), lambda s: "ok") is None


def test_broker_step_with_a_broker() -> None:
    c = _Control()
    assert broker_step(c, broker("kill"), lambda s: "ok") == "ok"
    assert broker_step(c, broker("restart"), lambda s: "ok") == "ok"
    assert c.calls == ["kill", "restart"]
    down = broker_down(qmp("blockdev-snapshot-sync"))
    # a step the dead broker should have failed, but that worked, is a failure
    assert broker_step(c, down, lambda s: "ok") != "ok"
    seen: list[Step] = []

    def fails(s: Step) -> str:
        seen.append(s)
        return "GenericError: Transport endpoint is not connected"

    assert broker_step(c, down, fails) == "ok"
    assert not seen[0].broker_down  # the command itself is run, unmarked
    assert c.down_errors == [(down.label, "GenericError: Transport endpoint is not connected")]


def test_broker_steps_survive_a_scenario_file(tmp_path: Path) -> None:
    matrix = [s for s in build_matrix() if "broker-restart" in s.name]
    assert {s.image for s in matrix} >= {"raw", "qcow2-v3"}
    path = tmp_path / "s.toml"
    path.write_text(dump(matrix))
    back = load(path)
    assert [s.steps for s in back] == [s.steps for s in matrix]
    path.write_text('[[scenario]]\nname="x"\nimage="raw"\n[[scenario.steps]]\nread={length=1}\n'
                    "broker_down = true\n")  # fmt: skip
    with pytest.raises(ScenarioFileError, match="broker_down"):
        load(path)
    path.write_text('[[scenario]]\nname="x"\nimage="raw"\n[[scenario.steps]]\nbroker="stop"\n')
    with pytest.raises(ScenarioFileError, match="kill"):
        load(path)


def _recipe_scenario(steps: tuple[Step, ...]) -> Scenario:
    return Scenario(
        name="restart-model",
        image="",
        recipe=("qemu-img create -q -f qcow2 d.qcow2 1M",),
        main="d.qcow2",
        format="qcow2",
        machine="pc",
        args=("-drive", "file=$IMAGE,format=$FORMAT,if=none,id=drive0"),
        steps=steps,
    )


def test_the_model_restarts_its_broker(tmp_path: Path) -> None:
    require(is_runnable(Path("/usr/bin/qemu-img")), "qemu-img")
    steps = get("broker-restart").steps
    restart = (*steps(OpContext(attach="drive")), QUIT)
    sc = _recipe_scenario(restart)
    res = model.run(prepare(sc, None, tmp_path / "a", "model", NOWHERE))
    assert res.ok, res.operations
    [(label, error)] = res.extra["broker_down_errors"]
    assert label == "blockdev-snapshot-sync (broker down)"
    assert "Transport endpoint is not connected" in error
    # the same work with the broker never killed: the same opens
    plain = tuple(s for s in restart if s.kind is not StepKind.BROKER and not s.broker_down)
    ref = model.run(prepare(dataclasses.replace(sc, steps=plain), None, tmp_path / "b", "model",
                            NOWHERE))  # fmt: skip
    assert ref.ok and res.trace == ref.trace
    assert any("snap2.qcow2" in o.path for o in res.trace)


@pytest.mark.qemu
@pytest.mark.stock_qemu
@pytest.mark.images
@pytest.mark.parametrize("image", ["raw", "qcow2-v3"])
def test_every_oracle_agrees(image: str, tmp_path: Path) -> None:
    require(INDEX.exists(), f"image index {INDEX} (run `make images`)")
    require(is_runnable(patched_qemu_path()), f"patched QEMU {patched_qemu_path()}")
    require(is_runnable(STOCK_QEMU), f"Debian's QEMU {STOCK_QEMU}")
    sc = {s.name: s for s in build_matrix()}[f"{image}_drive-device_broker-restart"]
    binaries = Binaries(patched=patched_qemu_path(), stock=STOCK_QEMU)
    r = run_scenario(sc, load_index(INDEX)[image], tmp_path, ("model", "patched", "stock"),
                     binaries=binaries)  # fmt: skip
    for name in ("model", "patched", "stock"):
        assert r.oracles[name].ok, (name, r.oracles[name].operations)
    [(_, error)] = r.oracles["patched"].extra["broker_down_errors"]
    assert "the open hook (-open-hook-fd) failed" in error
    assert len(r.oracles["patched"].extra["audits"]) == 2
    assert r.pair("model", "patched").status == Status.MATCH, r.pair("model", "patched").diff
    assert r.pair("patched", "stock").status == Status.MATCH, r.pair("patched", "stock").diff
