"""Oracle 3: upstream's fd sets, with the testbed playing libvirt.

QEMU is only ever told ``/dev/fdset/N``.  Like libvirt with ``-blockdev``,
the testbed must know every file before QEMU needs it, so it rewrites the
scenario the way libvirt would have to:

* every image named in the QEMU options or in a step is looked at first:
  its header is parsed for the backing chain and external data file
  (``qemu-img info --backing-chain``: the "duplicated parsing of image
  format headers" of the 2012 debate), and the chain is spelled out in the
  node options (``backing``, ``data-file``), so that QEMU never resolves a
  stored relative name under ``/dev/fdset/``;
* every file gets an fd set with an ``O_RDONLY`` member, and an ``O_RDWR``
  one where QEMU will write: the top of a writable chain, a ``file`` node
  opened read-write, a file a command names (overlay, mirror or backup
  target, new medium), and -- because it cannot be asked later -- every
  backing file a ``block-commit`` may reopen read-write, and a file a
  ``blockdev-reopen`` makes read-write.  A file a command will create
  (overlay, target) is created empty beforehand, as libvirt does;
* ``-add-fd`` passes the fds of files in the command line (opened before QMP
  exists), QMP ``add-fd`` those first named by a step, before the steps run;
* from QEMU 9.1 (10.0 here) the fd-set code also matches O_DIRECT, so a
  scenario with ``cache.direct=on`` gets its members opened with O_DIRECT
  (7.2 takes the plain fd and sets O_DIRECT on its dup itself).

A ``blockdev-change-medium`` becomes what libvirt sends with -blockdev:
``blockdev-add`` of the new medium with its chain spelled out, then
``blockdev-open-tray``, ``blockdev-remove-medium``, ``blockdev-insert-medium``,
``blockdev-close-tray``.  What cannot be spelled out stays a name and fails:
vmdk extents, vvfat's host files.
The grant is respected: ``ro`` passes no ``O_RDWR`` member, ``main``
passes only the main file.  The result is whether every step worked (and
QEMU's error if not), with what had to be pre-opened and which headers
were parsed, for the report.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from testbed.block.options import parse_blockdev_arg, parse_keyval
from testbed.compare.runners.dispatch import run_step
from testbed.compare.runners.qemu_run import QemuSteps
from testbed.compare.runners.result import OracleResult
from testbed.compare.runners.setup import Setup
from testbed.compare.scenarios import Grant, Scenario
from testbed.compare.steps import Step, StepKind
from testbed.errors import ScenarioSetupError, TestbedError
from testbed.qemu import Machine, MachineConfig
from testbed.qemu.binaries import is_runnable
from testbed.qemu.commandline import blockdev_json, drive_keyval

FIRST_SET = 10
#: Step commands whose file names are node options (rewritten as trees, not strings).
_TREE_COMMANDS = frozenset({"blockdev-add"})
#: Commands that create an image (and the argument naming it) unless mode=existing.
_CREATING = {
    "drive-mirror": "target",
    "drive-backup": "target",
    "blockdev-snapshot-sync": "snapshot-file",
}


class Direct(enum.StrEnum):
    """Which O_DIRECT members a file's fd set gets (QEMU >= 9.1 matches that bit too)."""

    #: none: the access modes only
    NONE = ""
    #: each access mode with O_DIRECT instead (``cache.direct=on`` from the start)
    ONLY = "only"
    #: each access mode with and without O_DIRECT (a reopen turns it on)
    ALSO = "also"


@dataclass(kw_only=True)
class Member:
    """One file libvirt passes: its fd set and the access modes it pre-opens."""

    path: str
    fdset: int
    rdwr: bool = False
    directory: bool = False
    #: O_DIRECT members (see matches_o_direct).
    direct: Direct = Direct.NONE
    #: Named only by a step: passed with QMP add-fd after launch.
    late: bool = True
    why: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Layer:
    path: str
    format: str
    data_file: str | None = None


class Libvirt:
    """What the testbed, as libvirt, must know and open for one scenario."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.members: dict[str, Member] = {}
        #: "file (format)" for every header read.
        self.headers: list[str] = []
        self.created: list[str] = []
        self.node_files: dict[str, str] = {}
        self.chains: dict[str, list[Layer]] = {}
        self.layer_names: dict[str, str] = {}
        self.media = 0
        self.notes: list[str] = []
        sc = setup.scenario
        self.writable = sc.grant is not Grant.RO
        self.commit = any(s.kind is StepKind.QMP and s.command == "block-commit" for s in sc.steps)
        self.direct = asks_direct(sc) if matches_o_direct(setup.binaries.version) else Direct.NONE

    # -- files ------------------------------------------------------------------------

    def rel(self, path: str) -> str:
        try:
            return str(Path(path).relative_to(self.setup.root))
        except ValueError:
            return path

    def inside(self, value: Any) -> TypeGuard[str]:
        if not isinstance(value, str) or not value.startswith("/"):
            return False
        root = str(self.setup.root)
        return os.path.normpath(value).startswith(root + os.sep)

    def member(self, path: str, *, late: bool, rdwr: bool = False, why: str = "") -> Member:
        key = os.path.normpath(path)
        m = self.members.get(key)
        if m is None:
            m = Member(path=key, fdset=FIRST_SET + len(self.members), late=late)
            m.directory = os.path.isdir(key)
            m.direct = Direct.NONE if m.directory else self.direct
            self.members[key] = m
        m.late = m.late and late
        if rdwr and self.writable and not m.directory:
            m.rdwr = True
            if why and why not in m.why:
                m.why.append(why)
        return m

    def fdset_name(self, path: str, *, late: bool, rdwr: bool = False, why: str = "") -> str:
        return f"/dev/fdset/{self.member(path, late=late, rdwr=rdwr, why=why).fdset}"

    def layer_name(self, path: str) -> str:
        name = f"layer{self.member(path, late=True).fdset}"
        self.layer_names[os.path.normpath(path)] = name
        return name

    def chain(self, path: str, fmt: str | None) -> list[Layer]:
        """The image's chain, from its headers (``qemu-img info --backing-chain``)."""
        key = os.path.normpath(path)
        if key in self.chains:
            return self.chains[key]
        cmd = ["qemu-img", "info", "-U", "--backing-chain", "--output=json"]
        if fmt:
            cmd += ["-f", fmt]
        done = subprocess.run(
            [*cmd, key], capture_output=True, text=True, timeout=60, cwd=os.path.dirname(key)
        )
        if done.returncode != 0:
            raise ScenarioSetupError(f"qemu-img info --backing-chain {key}: {done.stderr.strip()}")
        layers = []
        for info in json.loads(done.stdout):
            p = os.path.normpath(os.path.join(os.path.dirname(key), info["filename"]))
            data = info.get("format-specific", {}).get("data", {}).get("data-file")
            layers.append(
                Layer(
                    path=p,
                    format=info["format"],
                    data_file=os.path.join(os.path.dirname(p), data) if data else None,
                )
            )
            self.headers.append(f"{self.rel(p)} ({info['format']})")
        self.chains[key] = layers
        return layers

    # -- node options -------------------------------------------------------------------

    def spelled(
        self, path: str, fmt: str | None, *, late: bool, writable: bool, given: dict[str, Any]
    ) -> dict[str, Any]:
        """A format node over ``path`` with its chain spelled out (keys in ``given`` win)."""
        layers = self.chain(path, fmt)
        main = self.setup.main
        if self.setup.scenario.grant is Grant.MAIN:
            # libvirt refuses by not passing: only the granted file gets an fd set
            layers = [ly for ly in layers if os.path.normpath(ly.path) == os.path.normpath(main)]
            if not layers:
                return dict(given)
        return self._layer_options(layers, 0, late=late, writable=writable, given=given)

    def _layer_options(
        self, layers: list[Layer], i: int, *, late: bool, writable: bool, given: dict[str, Any]
    ) -> dict[str, Any]:
        layer = layers[i]
        top = i == 0
        why = "the top of a writable chain" if top else "block-commit reopens it read-write"
        rdwr = (top and writable) or (not top and self.commit)
        opts: dict[str, Any] = {"driver": given.get("driver", layer.format)}
        if "node-name" not in given:
            # libvirt names every layer: jobs then take node names, not file names
            opts["node-name"] = self.layer_name(layer.path)
        opts["file"] = {
            "driver": "file",
            "filename": self.fdset_name(layer.path, late=late, rdwr=rdwr, why=why),
        }
        if layer.data_file:
            opts["data-file"] = {
                "driver": "file",
                "filename": self.fdset_name(
                    layer.data_file, late=late, rdwr=top and writable, why="a data file"
                ),
            }
        if i + 1 < len(layers) and "backing" not in given:
            opts["backing"] = self._layer_options(
                layers, i + 1, late=late, writable=writable, given={}
            )
        rest = {k: v for k, v in given.items() if k not in ("file", "driver", "format")}
        return {**opts, **rest}

    def blockdev_tree(self, tree: dict[str, Any], *, late: bool) -> dict[str, Any]:
        """``-blockdev``/``blockdev-add`` options with files turned into fd sets."""
        out = dict(tree)
        writable = not _on(tree.get("read-only"))
        driver = tree.get("driver")
        if driver == "file":
            path = tree.get("filename")
            if self.inside(path):
                out["filename"] = self.fdset_name(
                    path, late=late, rdwr=writable, why="a read-write file node"
                )
                if isinstance(tree.get("node-name"), str):
                    self.node_files[tree["node-name"]] = path
            return out
        file = tree.get("file")
        path = None
        if (
            isinstance(file, dict)
            and file.get("driver") == "file"
            and self.inside(file.get("filename"))
        ):
            path = file["filename"]
        if path is not None:
            return self.spelled(path, driver, late=late, writable=writable, given=tree)
        if isinstance(file, str) and file in self.node_files:
            # a node reference: the chain behind the named file node still needs spelling
            layers = self.chain(self.node_files[file], driver)
            if len(layers) > 1 and "backing" not in tree:
                out["backing"] = self._layer_options(layers, 1, late=late, writable=False, given={})
        return out

    def drive(self, text: str) -> str:
        """A ``-drive`` with its image (a path, ``json:``, ``fat:``) turned into fd sets."""
        tree = parse_keyval(text, implied="file")
        file = tree.get("file")
        if not isinstance(file, str):
            return text
        fmt = tree.get("format")
        rest = {k: v for k, v in tree.items() if k not in ("file", "format")}
        writable = not _on(tree.get("read-only")) and not _on(tree.get("snapshot"))
        if file.startswith("json:"):
            inner = json.loads(file[len("json:") :])
            node = self.blockdev_tree(inner, late=False)
        elif file.startswith("fat:"):
            head, _, directory = file.rpartition(":")
            # vvfat takes a directory name: the closest an fd set can come
            return drive_keyval(
                {
                    **rest,
                    "format": fmt or "raw",
                    "file": f"{head}:{self.fdset_name(directory, late=False)}",
                }
            )
        elif self.inside(file):
            node = self.spelled(file, fmt, late=False, writable=writable, given={})
        else:
            return text
        return drive_keyval({**rest, **node})

    # -- steps ----------------------------------------------------------------------

    def steps(self, step: Step) -> list[Step]:
        """``step`` as libvirt would send it (a medium change becomes several)."""
        if step.kind is StepKind.QMP and step.command == "blockdev-change-medium":
            return self._change_medium(step)
        return [self.step(step)]

    def _change_medium(self, step: Step) -> list[Step]:
        """libvirt with -blockdev: tray open, old medium out, a node with its chain in."""
        args = step.arguments
        path, device = args.get("filename"), args.get("id") or args.get("device")
        if not self.inside(path) or not isinstance(device, str):
            return [self.step(step)]
        self.media += 1
        name = f"medium{self.media}"
        node = self.spelled(
            path, args.get("format"), late=True, writable=False, given={"node-name": name}
        )
        node["read-only"] = True
        tray = {"id": device}
        return [
            Step(kind=StepKind.QMP, command="blockdev-add", arguments=node),
            Step(
                kind=StepKind.QMP, command="blockdev-open-tray", arguments={**tray, "force": True}
            ),
            Step(kind=StepKind.QMP, command="blockdev-remove-medium", arguments=tray),
            Step(
                kind=StepKind.QMP,
                command="blockdev-insert-medium",
                arguments={**tray, "node-name": name},
            ),
            Step(kind=StepKind.QMP, command="blockdev-close-tray", arguments=tray),
        ]

    def step(self, step: Step) -> Step:
        if step.kind is StepKind.HMP:
            # HMP has no mode=existing: an empty file is the most libvirt can make
            words = [self._strings(w, step.label) for w in step.line.split(" ")]
            return _with(step, line=" ".join(words))
        if step.kind is not StepKind.QMP:
            return step
        if step.command in _TREE_COMMANDS:
            return _with(step, arguments=self.blockdev_tree(step.arguments, late=True))
        if step.command in ("block-commit", "block-stream"):
            args = dict(step.arguments)
            for key in ("top", "base"):
                path = args.get(key)
                if self.inside(path) and os.path.normpath(path) in self.layer_names:
                    args[f"{key}-node"] = self.layer_names[os.path.normpath(args.pop(key))]
            return _with(step, arguments=self._strings(args, step.label))
        if step.command in _CREATING and step.arguments.get("mode") != "existing":
            return self._precreate(step)
        if step.command == "blockdev-reopen":
            opts = [self._reopen(o) for o in step.arguments.get("options", [])]
            return _with(step, arguments={**step.arguments, "options": opts})
        return _with(step, arguments=self._strings(step.arguments, step.label))

    def _precreate(self, step: Step) -> Step:
        """libvirt makes the image a command would create, and says mode=existing."""
        args = dict(step.arguments)
        key = _CREATING[step.command]
        target = args.get(key)
        if not self.inside(target) or os.path.exists(target):
            return _with(step, arguments=self._strings(args, step.label))
        fmt = args.get("format", "qcow2")
        size = self._source_size()
        cmd = ["qemu-img", "create", "-q", "-f", fmt]
        if step.command == "drive-backup" and args.get("sync") == "top":
            backing = self._source_backing()
            if backing is not None:
                # the target opens with its backing: name it as QEMU will find it
                cmd += ["-u", "-b", self.fdset_name(backing.path, late=True), "-F", backing.format]
        done = subprocess.run([*cmd, target, str(size)], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise ScenarioSetupError(f"qemu-img create {target}: {done.stderr.strip()}")
        self.created.append(f"{self.rel(target)} (qemu-img create -f {fmt}, then mode=existing)")
        args["mode"] = "existing"
        return _with(step, arguments=self._strings(args, step.label))

    def _main_chain(self) -> list[Layer]:
        if self.setup.vvfat:
            return []
        return self.chain(str(self.setup.main), self.setup.format)

    def _source_size(self) -> int:
        done = subprocess.run(
            [
                "qemu-img",
                "info",
                "-U",
                "--output=json",
                "-f",
                self.setup.format,
                str(self.setup.main),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise ScenarioSetupError(f"qemu-img info {self.setup.main}: {done.stderr.strip()}")
        return int(json.loads(done.stdout)["virtual-size"])

    def _source_backing(self) -> Layer | None:
        layers = self._main_chain()
        return layers[1] if len(layers) > 1 else None

    def _reopen(self, opts: dict[str, Any]) -> dict[str, Any]:
        out = dict(opts)
        path = opts.get("filename")
        if self.inside(path):
            rdwr = opts.get("read-only") is False
            out["filename"] = self.fdset_name(
                path, late=True, rdwr=rdwr, why="blockdev-reopen makes it read-write"
            )
        return out

    def _strings(self, value: Any, label: str) -> Any:
        if isinstance(value, dict):
            return {k: self._strings(v, label) for k, v in value.items()}
        if isinstance(value, list):
            return [self._strings(v, label) for v in value]
        if self.inside(value):
            if not os.path.exists(value):
                Path(value).touch()  # libvirt creates what QEMU will create
                self.created.append(f"{self.rel(value)} (an empty file)")
            return self.fdset_name(value, late=True, rdwr=True, why=f"named by {label}")
        return value

    def report(self) -> dict[str, Any]:
        return {
            "preopened": [
                f"{self.rel(m.path)} {'O_RDONLY|O_DIRECTORY' if m.directory else 'O_RDONLY'}"
                + (f" + O_RDWR ({'; '.join(m.why)})" if m.rdwr else "")
                + (f" {_DIRECT_TEXT[m.direct]}" if m.direct else "")
                for m in self.members.values()
            ],
            "headers": list(dict.fromkeys(self.headers)),
            "created": self.created,
        }


#: QEMU 9.1's "monitor: fdset: Match against O_DIRECT" (monitor/fds.c): a
#: member is chosen only if its O_DIRECT bit equals the open's as well as its
#: access mode.  Before (7.2) only the access mode counted and QEMU set
#: O_DIRECT on the dup with fcntl.
O_DIRECT_MATCHED_FROM = (9, 1)
_DIRECT_TEXT = {
    Direct.ONLY: "[each with O_DIRECT: cache.direct=on, QEMU >= 9.1 matches it]",
    Direct.ALSO: (
        "[each also with O_DIRECT: a reopen turns cache.direct on, QEMU >= 9.1 matches it]"
    ),
}


def matches_o_direct(version: str) -> bool:
    """Whether ``version``'s fd sets pick a member by its O_DIRECT bit too."""
    try:
        parts = tuple(int(x) for x in version.split("."))
    except ValueError:
        raise ScenarioSetupError(f"QEMU version {version!r} is not numbers and dots") from None
    return parts >= O_DIRECT_MATCHED_FROM


def asks_direct(scenario: Scenario) -> Direct:
    """Which O_DIRECT members the scenario needs.

    An image attached or added with ``cache.direct=on`` is only ever opened
    with O_DIRECT ("only"); a ``blockdev-reopen`` that turns it on (and off
    again) reopens the file both ways ("also").
    """
    reopens = any(
        s.kind is StepKind.QMP
        and s.command == "blockdev-reopen"
        and "'direct': True" in repr(s.arguments)
        for s in scenario.steps
    )
    if reopens:
        return Direct.ALSO
    if any("cache.direct=on" in a for a in scenario.args):
        return Direct.ONLY
    added = any(
        s.kind is StepKind.QMP
        and s.command in _TREE_COMMANDS
        and _on((s.arguments.get("cache") or {}).get("direct"))
        for s in scenario.steps
    )
    return Direct.ONLY if added else Direct.NONE


def _on(value: Any) -> bool:
    return value is True or value in ("on", "true")


def _with(step: Step, **changes: Any) -> Step:
    fields = {
        "kind": step.kind,
        "command": step.command,
        "arguments": step.arguments,
        "line": step.line,
        "job": step.job,
        "device": step.device,
        "offset": step.offset,
        "length": step.length,
        "timeout": step.timeout,
        "broker_down": step.broker_down,
    }
    return Step(**{**fields, **changes})


def rewrite_args(lib: Libvirt, args: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        if word in ("-drive", "-blockdev") and i + 1 < len(args):
            if word == "-drive":
                out += [word, lib.drive(args[i + 1])]
            else:
                tree = lib.blockdev_tree(parse_blockdev_arg(args[i + 1]), late=False)
                out += [word, blockdev_json(tree)]
            i += 2
            continue
        out.append(word)
        i += 1
    return out


def _open_member(m: Member, *, inheritable: bool) -> list[int]:
    if m.directory:
        modes = [os.O_RDONLY | os.O_DIRECTORY]
    else:
        modes = [os.O_RDONLY, os.O_RDWR] if m.rdwr else [os.O_RDONLY]
        direct = [mode | os.O_DIRECT for mode in modes]
        modes = {Direct.NONE: modes, Direct.ONLY: direct, Direct.ALSO: [*modes, *direct]}[m.direct]
    fds = []
    for flags in modes:
        fd = os.open(m.path, flags | (0 if inheritable else os.O_CLOEXEC))
        if inheritable:
            os.set_inheritable(fd, True)
        fds.append(fd)
    return fds


def run(setup: Setup) -> OracleResult:
    """The fd-set oracle: open every member, start stock QEMU with them, run the steps.

    Long because the descriptors it opens (before the launch and
    late) are closed on every way out by one ``finally``, so the run stays inside it.
    """
    result = OracleResult()
    binary = setup.binaries.stock
    if not is_runnable(binary):
        result.skipped = f"Debian's QEMU {binary} is missing"
        return result
    lib = Libvirt(setup)
    args = rewrite_args(lib, setup.args())
    steps = [s for step in setup.steps() for s in lib.steps(step)]
    result.extra.update(lib.report())
    log = setup.logs / "fdset-qemu.log"
    log.unlink(missing_ok=True)
    fds: list[int] = []
    try:
        extra: list[str] = []
        for m in lib.members.values():
            if m.late:
                continue
            for fd in _open_member(m, inheritable=True):
                fds.append(fd)
                extra += ["-add-fd", f"fd={fd},set={m.fdset}"]
        config = MachineConfig(
            binary=binary,
            machine=setup.scenario.machine,
            args=(*extra, *args),
            pass_fds=tuple(fds),
            env=setup.env(),
            log_path=log,
        )
        vm = Machine(config)
        try:
            vm.launch()
        except TestbedError as err:
            result.operations.append(("launch", _first_line(vm, err)))
            vm.shutdown()
            return result
        result.operations.append(("launch", "ok"))
        if setup.tmpdir:
            result.operations.append(
                (
                    "temporary overlay",
                    "cannot be passed: QEMU creates $TMPDIR/vl.XXXXXX itself (g_mkstemp, a "
                    "random name); a confined QEMU must be allowed to create files there",
                )
            )
        try:
            for m in lib.members.values():
                if not m.late:
                    continue
                for fd in _open_member(m, inheritable=False):
                    fds.append(fd)
                    vm.add_fd(fd, fdset_id=m.fdset)
            failed: dict[str, str] = {}
            target = QemuSteps(vm)
            for step in steps:
                outcome = run_step(target, step, failed_jobs=failed)
                result.operations.append((step.label, outcome))
        finally:
            vm.shutdown()
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    result.log = str(log)
    result.extra["args"] = args
    return result


def _first_line(vm: Machine, err: TestbedError) -> str:
    for line in vm.read_log().splitlines():
        if "qemu-system" in line:
            return line.strip()[:400]
    return str(err).splitlines()[0]
