"""One guest boot, step by step: disk, broker, QEMU, console, checks.

A :class:`Session` owns everything one boot needs and gives the scenarios
(``testbed boot`` and the tests) the steps to compose: boot, check the
pattern, write records, take snapshots, kill the broker, shut down, verify.
"""

from __future__ import annotations

import logging
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pexpect
from pexpect.fdpexpect import fdspawn

from testbed.broker import Broker, Policy
from testbed.errors import GuestError, QEMUError, WaitTimeout
from testbed.guest.artifacts import FIRMWARE_DIRS, find_guest, find_qemu
from testbed.guest.console import PROMPT, Console, StepResult
from testbed.guest.disk import Disk, make_disk
from testbed.guest.launch import GuestQemu, LaunchConfig
from testbed.guest.records import (
    ChainReport,
    DiskLayout,
    SnapshotMark,
    pattern_digest,
    verify_chain,
)

log = logging.getLogger(__name__)

SYNCED = r"SYNCED (\d+)\r?\n"


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
    #: hide the image directory from QEMU in a private mount namespace
    sandbox: bool = False
    #: QEMU binary; default: the patched build with the hook, Debian's without
    qemu: Path | None = None
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
        self._on_step = on_step
        self.disk: Disk | None = None
        self.broker: Broker | None = None
        self.broker_proc: subprocess.Popen[bytes] | None = None
        self.qemu: GuestQemu | None = None
        self.console: Console | None = None
        self.synced: list[int] = []
        self.marks: list[SnapshotMark] = []
        self.next_seq = 0
        self.writer_done = True
        self.booted = False

    # -- set-up -------------------------------------------------------------

    def start(self) -> Session:
        """Make the disk, start the broker and QEMU, wait for the guest's shell."""
        cfg = self.config
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        self.disk = make_disk(self.image_dir, cfg.fmt, run=self.run, layout=cfg.layout)
        guest = find_guest(cfg.guest_dir)
        binary = cfg.qemu or find_qemu(patched=cfg.hook)
        hook = self._start_broker() if cfg.hook else None
        launch = LaunchConfig(
            binary=binary, kernel=guest.kernel, initrd=guest.initrd, drive=self._drive(),
            accel=cfg.accel, firmware_dirs=FIRMWARE_DIRS, hook=hook,
            hide=(self.image_dir,) if cfg.sandbox else (),
            log_path=cfg.workdir / "qemu.log",
        )
        log.info("booting %s guest with accel=%s (hook=%s, sandbox=%s)",
                 cfg.fmt, cfg.accel, cfg.hook, cfg.sandbox)
        self.qemu = GuestQemu(launch)
        child = fdspawn(self.qemu.console.fileno(), encoding="utf-8", codec_errors="replace")
        self.console = Console(child, self.console_log, on_step=self._on_step)
        self.console.expect("boot", r"TESTBED-GUEST: ready", timeout=cfg.boot_timeout)
        self.console.expect("shell", PROMPT, timeout=cfg.step_timeout, record=False)
        self.booted = True
        return self

    def _drive(self) -> str:
        assert self.disk is not None
        if self.disk.fmt == "vvfat":
            # QEMU's fat: protocol is read-only unless asked for rw:
            return f"file=fat:{self.disk.path},format=raw,readonly=on"
        return f"file={self.disk.path},format={self.disk.fmt},cache=writeback"

    def _policy_args(self) -> tuple[list[str], list[str], list[str]]:
        """ro, rw, create grants: the image directory, as the boot needs it."""
        assert self.disk is not None
        d = str(self.image_dir)
        if self.disk.fmt == "vvfat":
            return [d], [], []
        if self.config.allow_create:
            return [], [], [d]
        return [], [str(self.disk.path)], []

    def _start_broker(self) -> socket.socket:
        ro, rw, create = self._policy_args()
        ours, theirs = socket.socketpair()
        if self.config.broker_process:
            argv = [sys.executable, "-m", "testbed", "broker", "--fd", str(ours.fileno()),
                    "--audit", str(self.audit_path)]
            for flag, paths in (("--allow-ro", ro), ("--allow-rw", rw), ("--allow-create", create)):
                for p in paths:
                    argv += [flag, p]
            self.broker_proc = subprocess.Popen(argv, pass_fds=[ours.fileno()],
                                                stdin=subprocess.DEVNULL)
            ours.close()
        else:
            self.broker = Broker(Policy.from_grants(ro=ro, rw=rw, create=create),
                                 audit_path=self.audit_path)
            self.broker.add_connection(ours)
            self.broker.start()
        return theirs

    # -- steps --------------------------------------------------------------

    @property
    def con(self) -> Console:
        if self.console is None:
            raise GuestError("session", "the guest is not booted (call start())")
        return self.console

    @property
    def vm(self) -> GuestQemu:
        if self.qemu is None:
            raise QEMUError("QEMU is not running (call start())")
        return self.qemu

    def check_pattern(self) -> str:
        """The guest reads the pattern area; its sha256 must be the host's."""
        layout = self.config.layout
        m = self.con.command("pattern", f"tb pattern {layout.pattern_sectors}",
                             r"PATTERN ([0-9a-f]{64})", timeout=self.config.step_timeout)
        want = pattern_digest(self.run, layout)
        if m.group(1) != want:
            raise GuestError("pattern", f"guest read sha256 {m.group(1)}, host wrote {want}",
                             console_tail=self.con.tail())
        return want

    def check_fat(self) -> dict[str, str]:
        """The guest mounts the vvfat disk and checksums each host file."""
        assert self.disk is not None
        want = dict(self.disk.fat_sums)
        timeout = self.config.step_timeout
        self.con.child.sendline(f"tb fat /dev/vda1 {' '.join(want)}")
        got: dict[str, str] = {}
        for name in want:
            m = self.con.expect(f"fat {name}", rf"FATSUM ([0-9a-f]{{64}}) {name}\r?\n",
                                timeout=timeout)
            got[name] = m.group(1)
        self.con.expect("fat done", r"FAT DONE", timeout=timeout, record=False)
        self.con.expect("fat: prompt", PROMPT, timeout=timeout, record=False)
        if got != want:
            bad = sorted(n for n in want if got.get(n) != want[n])
            raise GuestError("fat", f"guest and host checksums differ for {bad}",
                             console_tail=self.con.tail())
        return got

    def start_writer(self, count: int) -> None:
        """Start ``tb write`` for the next ``count`` records (runs until done)."""
        if not self.writer_done:
            raise GuestError("write", "a writer is already running")
        layout = self.config.layout
        if self.next_seq + count > layout.max_records:
            raise GuestError("write", f"{self.next_seq + count} records do not fit the disk "
                             f"({layout.max_records} slots)")
        self.con.child.sendline(
            f"tb write {layout.record_start} {self.next_seq} {count} {self.run}")
        self._writer_end = self.next_seq + count - 1
        self.next_seq += count
        self.writer_done = False

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
            index = self.con.child.expect([SYNCED, r"WRITER DONE", pexpect.TIMEOUT],
                                          timeout=left)
            if index == 2:
                return
            if index == 1:
                self.writer_done = True
                return
            self.synced.append(int(self.con.child.match.group(1)))

    def finish_writer(self) -> int:
        """Wait for the writer to end; returns the number of records synced in all."""
        if not self.writer_done:
            self.wait_synced(self._writer_end)
            self.con.expect("write", r"WRITER DONE (\d+)", timeout=self.config.step_timeout)
            self.writer_done = True
        self.con.expect("write: prompt", PROMPT, timeout=self.config.step_timeout, record=False)
        return len(self.synced)

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
                out = self.vm.hmp(f"snapshot_blkdev {GuestQemu.DRIVE_ID} {overlay} qcow2")
                if out.strip():
                    raise QEMUError(f"HMP snapshot_blkdev {overlay.name}: {out.strip()}")
            elif kind == "qmp":
                self.vm.command("blockdev-snapshot-sync", device=GuestQemu.DRIVE_ID,
                                **{"snapshot-file": str(overlay), "format": "qcow2"})
            else:
                raise ValueError(f"unknown snapshot kind {kind!r} (hmp or qmp)")
        except QEMUError as err:
            self._step(step, False, time.monotonic() - t0, str(err))
            raise
        self.drain()
        after = self.synced[-1] if self.synced else -1
        mark = SnapshotMark(overlay=overlay, synced_before=before, synced_after=after)
        self.marks.append(mark)
        self._step(step, True, time.monotonic() - t0,
                   f"{overlay.name} after record {before}")
        return mark

    def _step(self, name: str, ok: bool, seconds: float, detail: str) -> None:
        result = StepResult(name=name, ok=ok, seconds=seconds, detail=detail)
        self.con.steps.append(result)
        if self._on_step is not None:
            self._on_step(result)

    def kill_broker(self) -> None:
        """Kill the broker process (only with ``broker_process``)."""
        if self.broker_proc is None:
            raise ValueError("kill_broker needs SessionConfig(broker_process=True)")
        self.broker_proc.send_signal(signal.SIGKILL)
        self.broker_proc.wait(10)

    def shutdown(self) -> str:
        """Power the guest off from inside and wait for QEMU to exit."""
        self.con.expect("power off", r"reboot: Power down", send="tb off",
                        timeout=self.config.step_timeout)
        try:
            self.vm.wait(self.config.step_timeout)
        except WaitTimeout:
            return self.vm.shutdown()
        self.vm.close()
        return "powered off"

    def verify(self) -> ChainReport:
        """Every synced record is on the disk (through the snapshot chain), none corrupt."""
        assert self.disk is not None
        report = verify_chain(base=self.disk.path, base_format=self.disk.fmt, marks=self.marks,
                              synced=self.synced, layout=self.config.layout, run=self.run)
        self._step("verify", True, 0.0,
                   f"{report.records_found} records found, {report.synced} synced, "
                   f"layers {dict(report.per_layer)}")
        return report

    # -- clean-up -----------------------------------------------------------

    def close(self) -> None:
        if self.qemu is not None and self.qemu.alive():
            self.qemu.shutdown(timeout=5)
        if self.console is not None:
            self.console.close()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self.broker_proc is not None and self.broker_proc.poll() is None:
            self.broker_proc.terminate()
            try:
                self.broker_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.broker_proc.kill()
                self.broker_proc.wait(10)

    def __enter__(self) -> Session:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
