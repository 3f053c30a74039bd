"""The names the runners share, where callers from before the split import them.

The runners' shared parts live in one module per concern:

* :mod:`~testbed.compare.runners.images` -- the corpus index (:class:`ImageInfo`);
* :mod:`~testbed.compare.runners.setup` -- :class:`Binaries`, :class:`Setup`, :func:`prepare`;
* :mod:`~testbed.compare.runners.result` -- :class:`OracleResult`;
* :mod:`~testbed.compare.runners.brokers` -- the ``broker`` steps;
* :mod:`~testbed.compare.runners.dispatch` -- one step on any oracle (:func:`run_step`);
* :mod:`~testbed.compare.runners.qemu_run` -- a scenario on a real QEMU.
"""

from __future__ import annotations

from testbed.compare.runners.brokers import BrokerControl, broker_step
from testbed.compare.runners.dispatch import StepTarget, run_step
from testbed.compare.runners.images import ImageInfo, load_index
from testbed.compare.runners.qemu_run import QemuSteps, run_qemu_scenario, wait_event
from testbed.compare.runners.result import OracleResult
from testbed.compare.runners.setup import SCENARIO_TMP, TEMP_DIR, Binaries, Setup, prepare
from testbed.errors import ScenarioSetupError

__all__ = [
    "SCENARIO_TMP",
    "TEMP_DIR",
    "Binaries",
    "BrokerControl",
    "ImageInfo",
    "OracleResult",
    "QemuSteps",
    "ScenarioSetupError",
    "Setup",
    "StepTarget",
    "broker_step",
    "load_index",
    "prepare",
    "run_qemu_scenario",
    "run_step",
    "wait_event",
]
