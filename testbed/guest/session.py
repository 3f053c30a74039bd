"""One guest boot, step by step: disk, broker, QEMU, console, checks.

A :class:`Session` owns everything one boot needs and gives the scenarios
(``testbed boot`` and the tests) the steps to compose: boot, check the
pattern, write records, take snapshots, kill the broker, shut down, verify.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pexpect
from pexpect.fdpexpect import fdspawn

from testbed.broker import AuditRecord, Broker, Policy, read_audit
from testbed.errors import GuestError, GuestUsageError, QEMUError
from testbed.guest.artifacts import find_guest, guest_qemu
from testbed.guest.console import PROMPT, Console, StepResult
from testbed.guest.disk import Disk, make_disk
from testbed.guest.events import EventMachine
from testbed.guest.jobs import JobRun
from testbed.guest.records import (
    ChainReport,
    DiskLayout,
    SnapshotMark,
    VerifyError,
    check_chain,
    pattern_digest,
)
from testbed.guest.sandbox import Sandbox, landlock_only, qemu_prefix
from testbed.qemu import MachineConfig
from testbed.qemu.commandline import Attach
from testbed.supervise.machine import supervised_config

log = logging.getLogger(__name__)

SYNCED = r"SYNCED (\d+)\r?\n"
DRIVE_ID = "disk0"
KERNEL_ARGS = "console=ttyS0 panic=-1 loglevel=4"


class Phase(enum.StrEnum):
    """Where a :class:`Session` is: before :meth:`Session.start`, booting, at the shell."""

    NEW = "new"
    STARTING = "starting"
    BOOTED = "booted"


@dataclass(frozen=True, kw_only=True)
class Writer:
    """A ``tb write`` the guest runs: its last record, when it started, whether it ended."""

    last: int
    started: float
    done: bool = False


@dataclass(frozen=True, kw_only=True)
class SessionConfig:
    """What to boot and how."""

    fmt: str
    workdir: Path
    accel: str = "tcg"
    #: send every open to a broker through -open-hook-fd (needs the patched QEMU)
    hook: bool = True
    #: run the broker as a separate ``python -m testbed broker --fd N`` process
    broker_process: bool = False
    #: grant O_CREAT in the image directory (snapshots need it)
    allow_create: bool = True
    #: keep QEMU off the image directory: a mount namespace, or Landlock (testbed.guest.sandbox)
    sandbox: Sandbox | None = None
    #: run a stock QEMU under the seccomp supervisor (testbed supervise), which serves its opens
    supervise: bool = False
    #: QEMU binary; default: ``qemu_version``'s patched build with the hook, its stock one without
    qemu: Path | None = None
    #: a version of testbed.qemu.versions ("7.2", "10.0"); None: the default (7.2)
    qemu_version: str | None = None
    guest_dir: Path | None = None
    layout: DiskLayout = field(default_factory=DiskLayout)
    boot_timeout: float = 120.0
    step_timeout: float = 60.0


class Session:
    """A booted guest and everything around it; a context manager that cleans up."""

    def __init__(
        self, config: SessionConfig, *, on_step: Callable[[StepResult], None] | None = None
    ) -> None:
        self.config = config
        self.run = secrets.token_hex(4)
        self.image_dir = config.workdir / "images"
        self.console_log = config.workdir / "console.log"
        self.audit_path = config.workdir / "audit.jsonl"
        #: every broker process's audit log, in start order (restart_broker adds one)
        self.audit_paths: list[Path] = [self.audit_path]
        #: monotonic time of the last kill_broker()
        self.killed_at: float | None = None
        self._on_step = on_step
        self.disk: Disk | None = None
        self.broker: Broker | None = None
        self.broker_pid: int | None = None
        self.qemu: EventMachine | None = None
        self.console: Console | None = None
        self.synced: list[int] = []
        self.marks: list[SnapshotMark] = []
        #: block jobs run so far (testbed.guest.jobrun appends)
        self.jobs: list[JobRun] = []
        self.next_seq = 0
        #: the ``tb write`` started last (None: none yet, or finished)
        self.writer: Writer | None = None
        self.phase = Phase.NEW
        self.accel_used: str | None = None
        self.report: ChainReport | None = None

    # -- set-up -------------------------------------------------------------

    def start(self) -> Session:
        """Make the disk, start the broker and QEMU, wait for the guest's shell."""
        cfg = self.config
        self._check_config()
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        self.phase = Phase.STARTING
        self.disk = make_disk(self.image_dir, cfg.fmt, run=self.run, layout=cfg.layout)
        guest = find_guest(cfg.guest_dir)
        binary = guest_qemu(hook=cfg.hook, qemu=cfg.qemu, version=cfg.qemu_version)
        # resolved: the supervisor's grants do not follow symlinks (build/guest is one)
        kernel, initrd = guest.kernel.resolve(), guest.initrd.resolve()
        machine = self._machine_config(binary, kernel, initrd)
        # what QEMU reads with plain open(): the guest files, a /usr-less build's prefix
        prefix = qemu_prefix(binary)
        read_only = (kernel.parent, initrd.parent, *((prefix,) if prefix else ()))
        machine = self._confined(machine, read_only)
        self.qemu = EventMachine(machine)
        if cfg.hook:
            self._start_broker(self.qemu)
        log.info(
            "booting %s guest with accel=%s (hook=%s, sandbox=%s, supervise=%s)",
            cfg.fmt,
            cfg.accel,
            cfg.hook,
            cfg.sandbox,
            cfg.supervise,
        )
        self._boot(self.qemu)
        self.phase = Phase.BOOTED
        return self

    def _check_config(self) -> None:
        cfg = self.config
        if cfg.supervise and cfg.hook:
            raise GuestUsageError("supervise serves a stock QEMU's opens itself: use hook=False")
        if cfg.supervise and cfg.sandbox is Sandbox.NAMESPACE:
            raise GuestUsageError("supervise confines with Landlock, not the mount namespace")

    def _machine_config(self, binary: Path, kernel: Path, initrd: Path) -> MachineConfig:
        """The QEMU that boots the guest kernel from the disk (before any confinement)."""
        cfg = self.config
        args = (
            "-m", "256", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", KERNEL_ARGS,
            *self.attach().argv(),
        )  # fmt: skip
        return MachineConfig(
            binary=binary,
            args=args,
            machine="pc",
            accel=cfg.accel,
            hook=cfg.hook,
            serial=True,
            hide_dirs=(self.image_dir.resolve(),) if cfg.sandbox is Sandbox.NAMESPACE else (),
            log_path=cfg.workdir / "qemu.log",
            launch_timeout=cfg.step_timeout,
            command_timeout=cfg.step_timeout,
        )

    def _confined(self, machine: MachineConfig, read_only: tuple[Path, ...]) -> MachineConfig:
        """``machine`` under the supervisor or Landlock, as the config asks.

        ``read_only`` is what QEMU must still read with a plain ``open()``.
        """
        cfg = self.config
        if cfg.supervise:
            return supervised_config(
                machine,
                self._policy(read_only),
                workdir=cfg.workdir,
                landlock=cfg.sandbox is Sandbox.LANDLOCK,
                audit=self.audit_path,
            )
        if cfg.sandbox is Sandbox.LANDLOCK:
            return landlock_only(machine, workdir=cfg.workdir, read_only=read_only)
        return machine

    def _boot(self, vm: EventMachine) -> None:
        """Launch QEMU and wait for the guest's ready line and shell prompt."""
        cfg = self.config
        vm.launch()
        self.accel_used = vm.accel_used
        child = fdspawn(vm.console_socket.fileno(), encoding="utf-8", codec_errors="replace")
        self.console = Console(child, self.console_log, on_step=self._on_step)
        self.console.expect("boot", r"TESTBED-GUEST: ready", timeout=cfg.boot_timeout)
        self.console.expect("shell", PROMPT, timeout=cfg.step_timeout, record=False)

    def attach(self) -> Attach:
        """How the disk is given to QEMU: ``-drive`` with a virtio-blk device."""
        assert self.disk is not None
        if self.disk.fmt == "vvfat":
            # QEMU's fat: protocol is read-only unless asked for rw: (written in
            # -drive's legacy spelling, as the boot always has)
            return Attach(
                filename=f"fat:{self.disk.path}",
                fmt="raw",
                node=DRIVE_ID,
                drive_extra=(("readonly", "on"),),
                device="virtio-blk-pci",
            )
        return Attach(
            filename=str(self.disk.path),
            fmt=self.disk.fmt,
            node=DRIVE_ID,
            cache="writeback",
            device="virtio-blk-pci",
        )

    def _policy_args(self) -> tuple[list[str], list[str], list[str]]:
        """ro, rw, create grants: the image directory, as the boot needs it."""
        assert self.disk is not None
        d = str(self.image_dir)
        if self.disk.fmt == "vvfat":
            return [d], [], []
        if self.config.allow_create:
            return [], [], [d]
        return [], [str(self.disk.path)], []

    def _broker_args(self, audit_path: Path) -> list[str]:
        """``testbed broker`` arguments granting what the boot needs, auditing to ``audit_path``."""
        ro, rw, create = self._policy_args()
        args = ["--audit", str(audit_path)]
        if self.config.fmt == "vvfat":
            args.append("--allow-directories")
        for flag, paths in (("--allow-ro", ro), ("--allow-rw", rw), ("--allow-create", create)):
            for p in paths:
                args += [flag, p]
        return args

    def _start_broker(self, vm: EventMachine) -> None:
        if self.config.broker_process:
            self.broker_pid = vm.start_broker_process(
                self._broker_args(self.audit_path), log_path=self.config.workdir / "broker.log"
            )
        else:
            self.broker = vm.start_broker(self._policy(), audit_path=self.audit_path)

    def _policy(self, read_only: tuple[Path, ...] = ()) -> Policy:
        """The broker's (or supervisor's) policy: the image grants, plus ``read_only``."""
        ro, rw, create = self._policy_args()
        # vvfat scans its tree through the hook (patch 0008) or openat: directory fds
        return Policy.from_grants(
            ro=[*ro, *map(str, read_only)],
            rw=rw,
            create=create,
            directories=self.config.fmt == "vvfat",
        )

    # -- steps --------------------------------------------------------------

    @property
    def con(self) -> Console:
        if self.console is None:
            raise GuestError("session", "the guest is not booted (call start())")
        return self.console

    @property
    def vm(self) -> EventMachine:
        if self.qemu is None:
            raise QEMUError("QEMU is not running (call start())")
        return self.qemu

    def check_pattern(self) -> str:
        """The guest reads the pattern area; its sha256 must be the host's."""
        layout = self.config.layout
        m = self.con.command(
            "pattern",
            f"tb pattern {layout.pattern_sectors}",
            r"PATTERN ([0-9a-f]{64})",
            timeout=self.config.step_timeout,
        )
        want = pattern_digest(self.run, layout)
        if m.group(1) != want:
            raise GuestError(
                "pattern",
                f"guest read sha256 {m.group(1)}, host wrote {want}",
                console_tail=self.con.tail(),
            )
        return want

    def check_fat(self) -> dict[str, str]:
        """The guest mounts the vvfat disk and checksums each host file."""
        assert self.disk is not None
        want = dict(self.disk.fat_sums)
        timeout = self.config.step_timeout
        self.con.child.sendline(f"tb fat /dev/vda1 {' '.join(want)}")
        got: dict[str, str] = {}
        for name in want:
            m = self.con.expect(
                f"fat {name}", rf"FATSUM ([0-9a-f]{{64}}) {name}\r?\n", timeout=timeout
            )
            got[name] = m.group(1)
        self.con.expect("fat done", r"FAT DONE", timeout=timeout, record=False)
        self.con.expect("fat: prompt", PROMPT, timeout=timeout, record=False)
        if got != want:
            bad = sorted(n for n in want if got.get(n) != want[n])
            raise GuestError(
                "fat", f"guest and host checksums differ for {bad}", console_tail=self.con.tail()
            )
        return got

    def start_writer(self, count: int) -> None:
        """Start ``tb write`` for the next ``count`` records (runs until done)."""
        if not self.writer_done:
            raise GuestError("write", "a writer is already running")
        layout = self.config.layout
        if self.next_seq + count > layout.max_records:
            raise GuestError(
                "write",
                f"{self.next_seq + count} records do not fit the disk ({layout.max_records} slots)",
            )
        self.con.child.sendline(
            f"tb write {layout.record_start} {self.next_seq} {count} {self.run}"
        )
        self.writer = Writer(last=self.next_seq + count - 1, started=time.monotonic())
        self.next_seq += count

    def wait_synced(self, seq: int, *, timeout: float | None = None) -> None:
        """Wait until the guest reports record ``seq`` synced."""
        limit = timeout or self.config.step_timeout
        while not self.synced or self.synced[-1] < seq:
            m = self.con.expect(f"synced {seq}", SYNCED, timeout=limit, record=False)
            self.synced.append(int(m.group(1)))

    def drain(self, window: float = 0.2) -> None:
        """Take in the SYNCED lines that arrive within ``window`` seconds.

        The window is fixed, not reset by each line: the writer never pauses,
        so "until quiet" would read to its end.
        """
        deadline = time.monotonic() + window
        while not self.writer_done:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            index = self.con.child.expect(
                [SYNCED, r"WRITER DONE", pexpect.TIMEOUT, pexpect.EOF], timeout=left
            )
            if index == 3:
                raise GuestError(
                    "write",
                    "console closed (QEMU exited?) while the guest wrote",
                    console_tail=self.con.tail(),
                )
            if index == 2:
                return
            if index == 1:
                assert self.writer is not None  # writer_done is False
                self.writer = dataclasses.replace(self.writer, done=True)
                return
            self.synced.append(int(self.con.child.match.group(1)))

    def finish_writer(self) -> int:
        """Wait for the writer to end; returns the number of records synced in all."""
        writer = self.writer
        if writer is None:
            raise GuestError("write", "no writer is running (call start_writer() first)")
        if not writer.done:
            self.wait_synced(writer.last)
            self.con.expect(
                "write", r"WRITER DONE (\d+)", timeout=self.config.step_timeout, record=False
            )
        self.writer = None
        self.note(
            "write",
            True,
            time.monotonic() - writer.started,
            f"{len(self.synced)} records synced, last {writer.last}",
        )
        self.con.expect("write: prompt", PROMPT, timeout=self.config.step_timeout, record=False)
        return len(self.synced)

    @property
    def writer_done(self) -> bool:
        """Whether no writer is left running (none started, or its end was seen)."""
        return self.writer is None or self.writer.done

    @property
    def booted(self) -> bool:
        """Whether :meth:`start` reached the guest's shell."""
        return self.phase is Phase.BOOTED

    def snapshot(self, kind: str, name: str | None = None) -> SnapshotMark:
        """A live external snapshot, HMP ``snapshot_blkdev`` or QMP ``blockdev-snapshot-sync``.

        Raises :class:`QEMUError` with QEMU's message when QEMU refuses.
        """
        overlay = self.image_dir / (name or f"snap{len(self.marks) + 1}.qcow2")
        self.drain(window=0.05)
        before = self.synced[-1] if self.synced else -1
        step = f"snapshot {len(self.marks) + 1} ({kind})"
        t0 = time.monotonic()
        try:
            if kind == "hmp":
                out = self.vm.hmp(f"snapshot_blkdev {DRIVE_ID} {overlay} qcow2")
                if out.strip():
                    raise QEMUError(f"HMP snapshot_blkdev {overlay.name}: {out.strip()}")
            elif kind == "qmp":
                self.vm.qmp(
                    "blockdev-snapshot-sync",
                    device=DRIVE_ID,
                    **{"snapshot-file": str(overlay), "format": "qcow2"},
                )
            else:
                raise GuestUsageError(f"unknown snapshot kind {kind!r} (hmp or qmp)")
        except QEMUError as err:
            self.note(step, False, time.monotonic() - t0, str(err))
            raise
        self.drain()
        after = self.synced[-1] if self.synced else -1
        mark = SnapshotMark(overlay=overlay, synced_before=before, synced_after=after)
        self.marks.append(mark)
        self.note(step, True, time.monotonic() - t0, f"{overlay.name} after record {before}")
        return mark

    def note(self, name: str, ok: bool, seconds: float, detail: str) -> None:
        """Record (and show) a step that is not a console wait: QMP commands, checks."""
        result = StepResult(name=name, ok=ok, seconds=seconds, detail=detail)
        self.con.steps.append(result)
        if self._on_step is not None:
            self._on_step(result)

    def audit_records(self) -> list[AuditRecord]:
        """What the brokers answered, from their audit logs (in-process or not), in order."""
        if self.broker is not None:
            return self.broker.records
        return [r for path in self.audit_paths if path.exists() for r in read_audit(path)]

    def kill_broker(self) -> None:
        """Kill the broker process (only with ``broker_process``)."""
        if self.broker_pid is None:
            raise GuestUsageError("kill_broker needs SessionConfig(broker_process=True)")
        for proc in self.vm.helpers:
            if proc.pid == self.broker_pid:
                self.killed_at = time.monotonic()
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)

    def restart_broker(self) -> int:
        """A new broker process (own audit log) attached to the running QEMU; its pid.

        Patch 0007: the socket goes to QEMU with QMP ``getfd``, ``open-hook-set``
        swaps it in and clears the broken state.
        """
        if not self.config.broker_process:
            raise GuestUsageError("restart_broker needs SessionConfig(broker_process=True)")
        n = len(self.audit_paths) + 1
        audit = self.config.workdir / f"audit-{n}.jsonl"
        t0 = time.monotonic()
        self.broker_pid = self.vm.reattach_broker_process(
            self._broker_args(audit), log_path=self.config.workdir / f"broker-{n}.log"
        )
        self.audit_paths.append(audit)
        self.note(
            "reattach broker", True, time.monotonic() - t0, f"broker {n}, pid {self.broker_pid}"
        )
        return self.broker_pid

    def open_hook_state(self) -> dict[str, object]:
        """QMP ``query-open-hook`` (patch 0007): state, requests, failures, last-error."""
        state = self.vm.qmp("query-open-hook")
        if not isinstance(state, dict):
            raise QEMUError(f"query-open-hook returned {state!r}, not an object")
        return state

    def shutdown(self) -> str:
        """Power the guest off from inside, wait for QEMU to exit; how it ended."""
        self.con.expect(
            "power off", r"reboot: Power down", send="tb off", timeout=self.config.step_timeout
        )
        proc = self.vm.process
        if proc is not None:
            try:
                proc.wait(self.config.step_timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "QEMU still running %gs after the guest powered off", self.config.step_timeout
                )
        return self.vm.shutdown()

    def verify(
        self,
        *,
        base: Path | None = None,
        base_format: str | None = None,
        marks: Sequence[SnapshotMark] | None = None,
    ) -> ChainReport:
        """Every synced record is on the disk (through the snapshot chain), none corrupt.

        By default the chain is the disk and the snapshots taken; a block
        job that changed the chain passes the one that should be left.
        The report is kept in :attr:`report`; problems raise :class:`VerifyError`.
        """
        assert self.disk is not None
        t0 = time.monotonic()
        report = check_chain(
            base=base or self.disk.path,
            base_format=base_format or self.disk.fmt,
            marks=self.marks if marks is None else marks,
            synced=self.synced,
            layout=self.config.layout,
            run=self.run,
        )
        self.report = report
        detail = (
            f"{report.verified}/{report.synced} synced records intact, "
            f"records per layer {dict(report.per_layer)}"
        )
        self.note("verify", not report.problems, time.monotonic() - t0, detail)
        if report.problems:
            raise VerifyError(report.problems)
        return report

    # -- clean-up -----------------------------------------------------------

    def close(self) -> None:
        if self.qemu is not None:
            self.qemu.shutdown()  # stops the brokers it started, too
        if self.console is not None:
            self.console.close()

    def __enter__(self) -> Session:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
