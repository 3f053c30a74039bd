"""Scenario files: ``testbed compare --scenario-file FILE.toml`` (and the built-ins, dumped).

A file holds ``[[scenario]]`` tables (the format is documented, with two
worked examples, in ``docs/compare.md``)::

    [[scenario]]
    name = "commit-mid"                   # letters, digits, _.+=-
    image = "qcow2-chain2-subdir"         # a corpus image, and/or:
    recipe = ["qemu-img create -q -f raw base.raw 4M"]   # shell, run in $D
    main = "top.qcow2"                    # the main file (required without image)
    format = "qcow2"                      # $FORMAT (default: the image's)
    machine = "pc"                        # default "none"
    args = ["-drive", "file=$IMAGE,format=$FORMAT,if=none,id=drive0"]
    grant = "create"                      # create | ro | main
    operation = "commit"                  # the summary row it counts under
    tags = ["tmpdir"]                     # tmpdir: TMPDIR=$D/tmp (-snapshot)

    [[scenario.steps]]                    # one of qmp/hmp/read/wait/op/quit each
    qmp = "block-commit"
    arguments = { device = "drive0", "job-id" = "job0", top = "$D/mid.qcow2" }

    [[scenario.steps]]
    wait = "BLOCK_JOB_COMPLETED"
    job = "job0"
    timeout = 60

    [[scenario.steps]]                    # kill | restart the hook's broker
    broker = "kill"

    [[scenario.steps]]                    # expected to fail: the broker is dead
    qmp = "query-block"
    broker_down = true

A last ``quit`` is added when missing.  Every error names the file, the
line and the key (``FILE:LINE: scenario[1].steps[2].wait: ...``).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.compare.attach import CUSTOM, DRIVE
from testbed.compare.ops import Op, OpContext, get
from testbed.compare.scenarios import GRANTS, Grant, Scenario
from testbed.compare.steps import (
    QUIT,
    WAIT_TIMEOUT,
    Step,
    StepKind,
    broker,
    broker_down,
    hmp,
    qmp,
    read,
    wait,
)
from testbed.errors import ScenarioDumpError, ScenarioFileError, UnknownOperationError

SCENARIO_KEYS = frozenset(
    {"name", "image", "recipe", "main", "format", "machine", "args", "grant", "operation",
     "attach", "tags", "steps"}
)  # fmt: skip
#: The key of a step that runs a built-in operation's steps (``op = "commit"``).
OP_KEY = "op"
#: The keys that say what a step is, one per step (the order error messages list them in).
STEP_KINDS: tuple[str, ...] = (
    StepKind.QMP,
    StepKind.HMP,
    StepKind.READ,
    StepKind.WAIT,
    OP_KEY,
    StepKind.BROKER,
    StepKind.QUIT,
)
STEP_KEYS = frozenset({*STEP_KINDS, "arguments", "job", "timeout", "broker_down"})


class _Lines:
    """Where tables and keys are in the file's text (tomllib gives no positions)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.scenarios = [
            i for i, ln in enumerate(self.lines) if re.match(r"\s*\[\[\s*scenario\s*\]\]", ln)
        ]
        self.steps = [
            i
            for i, ln in enumerate(self.lines)
            if re.match(r"\s*\[\[\s*scenario\.steps\s*\]\]", ln)
        ]

    def _block(self, index: int) -> tuple[int, int]:
        if index >= len(self.scenarios):
            return 0, len(self.lines)
        start = self.scenarios[index]
        end = self.scenarios[index + 1] if index + 1 < len(self.scenarios) else len(self.lines)
        return start, end

    def scenario(self, index: int, key: str = "") -> int:
        start, end = self._block(index)
        steps = [i for i in self.steps if start < i < end]
        stop = steps[0] if steps and key != "steps" else end
        return self._find(start, stop, key) if key else start + 1

    def step(self, scenario: int, index: int, key: str = "") -> int:
        start, end = self._block(scenario)
        steps = [i for i in self.steps if start < i < end]
        if index >= len(steps):
            return self.scenario(scenario, "steps")
        s = steps[index]
        stop = steps[index + 1] if index + 1 < len(steps) else end
        return self._find(s, stop, key) if key else s + 1

    def _find(self, start: int, stop: int, key: str) -> int:
        pattern = re.compile(rf'(^|[{{,\s])"?{re.escape(key)}"?\s*=')
        for i in range(start, stop):
            if pattern.search(self.lines[i]):
                return i + 1
        return start + 1


def load(path: Path) -> list[Scenario]:
    """The scenarios in ``path``; ScenarioFileError naming file, line and key if malformed."""
    name = str(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ScenarioFileError(name, 0, "", f"cannot read it: {err.strerror}") from err
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        m = re.search(r"at line (\d+)", str(err))
        raise ScenarioFileError(name, int(m.group(1)) if m else 0, "", f"not TOML: {err}") from err
    where = _Lines(text)
    extra = sorted(set(data) - {"scenario"})
    if extra:
        line = where._find(0, len(where.lines), extra[0])
        message = "unknown top-level key (a file holds [[scenario]] tables)"
        raise ScenarioFileError(name, line, extra[0], message)
    tables = data.get("scenario")
    if not isinstance(tables, list) or not tables:
        raise ScenarioFileError(name, 1, "scenario", "no [[scenario]] table in the file")
    return [_scenario(name, where, i, t) for i, t in enumerate(tables)]


def _scenario(path: str, where: _Lines, index: int, table: dict[str, Any]) -> Scenario:
    def fail(key: str, message: str, line: int | None = None) -> ScenarioFileError:
        return ScenarioFileError(
            path,
            line if line is not None else where.scenario(index, key),
            f"scenario[{index + 1}]" + (f".{key}" if key else ""),
            message,
        )

    for key in table:
        if key not in SCENARIO_KEYS:
            raise fail(key, f"unknown key (allowed: {', '.join(sorted(SCENARIO_KEYS))})")
    name = _string(table, "name", fail, required=True)
    image = _string(table, "image", fail)
    recipe = _strings(table, "recipe", fail)
    args = _strings(table, "args", fail)
    tags = _strings(table, "tags", fail)
    grant = _string(table, "grant", fail) or Grant.CREATE
    if grant not in GRANTS:
        raise fail("grant", f"{grant!r} is not one of {', '.join(GRANTS)}")
    attach = _string(table, "attach", fail) or CUSTOM
    raw_steps = table.get("steps", [])
    if not isinstance(raw_steps, list):
        raise fail("steps", "must be an array of tables ([[scenario.steps]])")
    steps: list[Step] = []
    for j, st in enumerate(raw_steps):
        steps += _steps(path, where, index, j, st, attach)
    if not steps or steps[-1].kind is not StepKind.QUIT:
        steps.append(QUIT)
    line = where.scenario(index)
    try:
        return Scenario(
            name=name,
            image=image,
            recipe=tuple(recipe),
            main=_string(table, "main", fail),
            format=_string(table, "format", fail),
            machine=_string(table, "machine", fail) or "none",
            args=tuple(args),
            grant=Grant(grant),
            operation=_string(table, "operation", fail) or "custom",
            attach=attach,
            tags=frozenset(tags),
            steps=tuple(steps),
            source=f"{path}:{line}",
        )
    except ValueError as err:
        raise fail("", str(err), line) from err


#: Makes the error for a key of the table being read (the message given).
_Fail = Callable[[str, str], ScenarioFileError]


@dataclass(frozen=True, kw_only=True)
class _StepTable:
    """One ``[[scenario.steps]]`` table, its kind found and its common keys checked."""

    kind: str
    #: The value of the kind's key (``qmp = "query-block"``: the command).
    value: Any
    table: dict[str, Any]
    #: ``broker_down = true``
    down: bool
    #: The scenario's attach label (an ``op`` step's context).
    attach: str
    fail: _Fail


def _qmp_step(t: _StepTable) -> list[Step]:
    arguments = t.table.get("arguments", {})
    if not isinstance(t.value, str) or not t.value:
        raise t.fail("qmp", "must be a QMP command name")
    if not isinstance(arguments, dict):
        raise t.fail("arguments", "must be a table")
    step = qmp(t.value, **arguments)
    return [broker_down(step) if t.down else step]


def _hmp_step(t: _StepTable) -> list[Step]:
    if not isinstance(t.value, str) or not t.value.strip():
        raise t.fail("hmp", "must be an HMP command line")
    return [broker_down(hmp(t.value)) if t.down else hmp(t.value)]


def _broker_step(t: _StepTable) -> list[Step]:
    if not isinstance(t.value, str):
        raise t.fail("broker", "must be kill or restart")
    return [broker(t.value)]


def _read_step(t: _StepTable) -> list[Step]:
    value = t.value
    if not isinstance(value, dict) or set(value) - {"offset", "length", "device"}:
        raise t.fail("read", "must be { offset = N, length = N[, device = NAME] }")
    offset, length = value.get("offset", 0), value.get("length")
    if not isinstance(offset, int) or not isinstance(length, int):
        raise t.fail("read", "offset and length must be integers")
    return [read(offset, length, str(value.get("device", DRIVE)))]


def _wait_step(t: _StepTable) -> list[Step]:
    if not isinstance(t.value, str) or not t.value:
        raise t.fail("wait", "must be a QMP event name")
    timeout = t.table.get("timeout", WAIT_TIMEOUT)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
        raise t.fail("timeout", "must be a number of seconds")
    return [wait(t.value, str(t.table.get("job", "")), float(timeout))]


def _op_step(t: _StepTable) -> list[Step]:
    if not isinstance(t.value, str):
        raise t.fail("op", "must be an operation name")
    try:
        op = get(t.value)
    except UnknownOperationError as err:
        raise t.fail("op", str(err.args[0])) from None
    return list(op.steps(OpContext(attach=t.attach)))


def _quit_step(t: _StepTable) -> list[Step]:
    if t.value is not True:
        raise t.fail("quit", "write quit = true")
    return [QUIT]


#: How each kind of step is read, in the order the error messages list them.
_STEP_READERS: dict[str, Callable[[_StepTable], list[Step]]] = {
    StepKind.QMP: _qmp_step,
    StepKind.HMP: _hmp_step,
    StepKind.READ: _read_step,
    StepKind.WAIT: _wait_step,
    OP_KEY: _op_step,
    StepKind.BROKER: _broker_step,
    StepKind.QUIT: _quit_step,
}
#: The keys a kind of step may have beside its own.
_STEP_EXTRAS: dict[str, frozenset[str]] = {
    StepKind.QMP: frozenset({"arguments", "broker_down"}),
    StepKind.HMP: frozenset({"broker_down"}),
    StepKind.WAIT: frozenset({"job", "timeout"}),
}


def _steps(path: str, where: _Lines, index: int, j: int, st: Any, attach: str) -> list[Step]:
    """The steps of one ``[[scenario.steps]]`` table, each error naming its key and line."""

    def fail(key: str, message: str) -> ScenarioFileError:
        return ScenarioFileError(
            path,
            where.step(index, j, key),
            f"scenario[{index + 1}].steps[{j + 1}]" + (f".{key}" if key else ""),
            message,
        )

    if not isinstance(st, dict):
        raise fail("", "a step must be a table")
    for key in st:
        if key not in STEP_KEYS:
            raise fail(key, f"unknown key (allowed: {', '.join(sorted(STEP_KEYS))})")
    kinds = [k for k in STEP_KINDS if k in st]
    if len(kinds) != 1:
        raise fail(
            "", f"give exactly one of {', '.join(STEP_KINDS)} (got {', '.join(kinds) or 'none'})"
        )
    kind = kinds[0]
    down = st.get("broker_down", False)
    if not isinstance(down, bool):
        raise fail("broker_down", "write broker_down = true (or leave it out)")
    for key in st:
        if key != kind and key not in _STEP_EXTRAS.get(kind, frozenset()):
            raise fail(key, f"does not go with {kind}")
    table = _StepTable(kind=kind, value=st[kind], table=st, down=down, attach=attach, fail=fail)
    try:
        return _STEP_READERS[kind](table)
    except ValueError as err:  # a ScenarioError from the step itself
        raise fail(kind, str(err)) from err


def _string(table: dict[str, Any], key: str, fail: Any, *, required: bool = False) -> str:
    value = table.get(key)
    if value is None:
        if required:
            raise fail(key, "is required")
        return ""
    if not isinstance(value, str):
        raise fail(key, f"must be a string, not {type(value).__name__}")
    return value


def _strings(table: dict[str, Any], key: str, fail: Any) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail(key, "must be an array of strings")
    return value


# -- writing ---------------------------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    raise ScenarioDumpError(value)


def dump(scenarios: Iterable[Scenario]) -> str:
    """The scenarios as a scenario file (``load(dump(x))`` gives ``x`` back)."""
    out: list[str] = []
    for sc in scenarios:
        out.append("[[scenario]]")
        fields: list[tuple[str, Any]] = [
            ("name", sc.name),
            ("image", sc.image),
            ("recipe", list(sc.recipe)),
            ("main", sc.main),
            ("format", sc.format),
            ("machine", sc.machine),
            ("args", list(sc.args)),
            ("grant", str(sc.grant)),
            ("operation", sc.operation),
            ("attach", sc.attach),
            ("tags", sorted(sc.tags)),
        ]
        for key, value in fields:
            if value or key == "name":
                out.append(f"{key} = {_toml(value)}")
        for step in sc.steps:
            out.append("")
            out.append("[[scenario.steps]]")
            if step.kind is StepKind.QMP:
                out.append(f"qmp = {_toml(step.command)}")
                if step.arguments:
                    out.append(f"arguments = {_toml(step.arguments)}")
            elif step.kind is StepKind.HMP:
                out.append(f"hmp = {_toml(step.line)}")
            elif step.kind is StepKind.READ:
                span = {"offset": step.offset, "length": step.length, "device": step.device}
                out.append(f"read = {_toml(span)}")
            elif step.kind is StepKind.WAIT:
                out.append(f"wait = {_toml(step.command)}")
                if step.job:
                    out.append(f"job = {_toml(step.job)}")
                out.append(f"timeout = {_toml(step.timeout)}")
            elif step.kind is StepKind.BROKER:
                out.append(f"broker = {_toml(step.command)}")
            else:
                out.append("quit = true")
            if step.broker_down:
                out.append("broker_down = true")
        out.append("")
    return "\n".join(out)


def dump_matrix(scenarios: list[Scenario], directory: Path) -> list[Path]:
    """One file per operation under ``directory``; the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Scenario]] = {}
    for sc in scenarios:
        groups.setdefault(sc.operation, []).append(sc)
    written = []
    for op, group in sorted(groups.items()):
        path = directory / f"{op}.toml"
        path.write_text(f"# built-in scenarios: {op} ({len(group)})\n\n" + dump(group))
        written.append(path)
    return written


__all__ = ["Op", "dump", "dump_matrix", "load"]
