"""``testbed libvirt demo``: libvirt's block jobs on a hooked or supervised QEMU, losing nothing.

One transient domain runs the testbed guest under Debian's libvirtd, its
QEMU as ``libvirt-qemu``, its images root's with mode 0600 in directories
that user can traverse but not list (libvirt checks the disk exists *as*
that user).  While the guest writes sequence-numbered records, the demo
runs ``virsh`` start, an external disk-only snapshot, ``blockcommit
--active --pivot``, ``blockcopy --pivot``, a second snapshot and
``blockpull``, a snapshot into a directory the policy does not grant (QEMU
must refuse, libvirt must roll back), and ``destroy``; then the guest
part's checker reads the final image and every record the guest reported
synced must be there.  Before all that, the same domain with the patched
QEMU as its emulator but no hook must fail to start (``Permission
denied``): the images reach QEMU only through the broker.

``--supervise`` runs the same script on stock QEMU (Debian's 7.2, or the
stock build of another version): the wrapper is confined by the domain's
seccomp supervisor and Landlock before it execs QEMU, and every open QEMU
makes is served by ``testbed libvirt serve --supervise``; the control is
the same domain with stock QEMU itself as its emulator.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import re
import secrets
import select
import shutil
import subprocess
import sys
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pexpect
from pexpect.fdpexpect import fdspawn

from testbed.broker import read_audit
from testbed.errors import LibvirtError, TestbedError, WaitTimeout
from testbed.guest.console import PROMPT, Console
from testbed.guest.disk import make_disk
from testbed.guest.records import ChainReport, DiskLayout, check_chain, pattern_digest
from testbed.libvirt import virsh as _virsh
from testbed.libvirt.daemons import Daemons
from testbed.libvirt.domain import DomainConfig, define, domain_xml
from testbed.libvirt.emulator import Mode
from testbed.libvirt.install import PREFIX, Installed, install
from testbed.libvirt.serve import QEMU_USER, qemu_ids
from testbed.libvirt.virsh import disk_sources, domain_exists

log = logging.getLogger(__name__)

WORKDIR = Path("/var/lib/testbed/libvirt/demo")
SYNCED = r"SYNCED (\d+)\r?\n"
PIDFILE_DIR = Path("/run/libvirt/qemu")


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    qemu_version: str = "7.2"
    supervise: bool = False
    workdir: Path = WORKDIR
    prefix: Path = PREFIX
    #: records the guest may write in all (the run destroys it long before)
    records: int = 20000
    #: records to let through between two steps, so each layer gets some
    between: int = 3
    boot_timeout: float = 180.0
    step_timeout: float = 120.0
    keep: bool = False


@dataclass(frozen=True, kw_only=True)
class DemoStep:
    name: str
    ok: bool
    error: str | None = None
    seconds: float = 0.0
    #: of ``seconds``, the time spent in ``virsh`` (the rest waits for the guest)
    virsh_seconds: float = 0.0
    broker_requests: int = 0
    #: of ``broker_requests``, those for files in the demo's directory (the
    #: images); the rest are a supervised QEMU's libraries, firmware, /proc...
    image_requests: int = 0
    detail: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "ok": self.ok,
            "error": self.error,
            "seconds": round(self.seconds, 3),
            "virsh_seconds": round(self.virsh_seconds, 3),
            "broker_requests": self.broker_requests,
            "image_requests": self.image_requests,
            "detail": self.detail,
        }


@dataclass(frozen=True, kw_only=True)
class DemoResult:
    domain: str
    qemu_version: str
    mode: str
    steps: tuple[DemoStep, ...]
    records_written: int
    records_verified: int
    lost: int
    broker_requests: int
    qemu_user: str | None
    image_requests: int = 0
    console_log: str
    audit_log: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and all(s.ok for s in self.steps)
            and self.lost == 0
            and self.qemu_user not in (None, "root")
        )

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "domain": self.domain,
            "qemu_version": self.qemu_version,
            "mode": self.mode,
            "steps": [s.to_json() for s in self.steps],
            "records_written": self.records_written,
            "records_verified": self.records_verified,
            "lost": self.lost,
            "broker_requests": self.broker_requests,
            "image_requests": self.image_requests,
            "qemu_user": self.qemu_user,
            "console_log": self.console_log,
            "audit_log": self.audit_log,
            "error": self.error,
        }

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")


def traversable_dir(path: Path, mode: int = 0o711) -> Path:
    """``path`` made (root's, ``mode``), every ancestor searchable by others."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    for parent in path.resolve().parents:
        if not os.stat(parent).st_mode & 0o001:
            raise LibvirtError(
                f"{parent} is not searchable by other users, so libvirt-qemu cannot reach "
                f"{path} (libvirt checks disks as that user): choose a --workdir elsewhere"
            )
    return path


def confinement_of(pid: int) -> str:
    """What ``/proc/PID/status`` says of a supervised QEMU's confinement; raises if it is not.

    Landlock has no line there; its effect is the control step (QEMU alone
    cannot open the disk) and tests/libvirt/test_libvirt_handoff.py.
    """
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )  # fmt: skip
    nnp = fields.get("NoNewPrivs", "").strip()
    mode = fields.get("Seccomp", "").strip()
    filters = fields.get("Seccomp_filters", "?").strip()
    if nnp != "1" or mode != "2":
        raise LibvirtError(f"QEMU pid {pid} is not under a seccomp filter (NoNewPrivs {nnp}, "
                           f"Seccomp {mode})")  # fmt: skip
    return f"NoNewPrivs 1, Seccomp filter mode, {filters} filters"


def qemu_process_user(name: str) -> tuple[int, str]:
    """The pid and user name of domain ``name``'s QEMU (from libvirt's pidfile)."""
    pid = int((PIDFILE_DIR / f"{name}.pid").read_text().strip())
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[1])
            try:
                return pid, pwd.getpwuid(uid).pw_name
            except KeyError:
                return pid, str(uid)
    raise LibvirtError(f"no Uid line in /proc/{pid}/status")


class Demo:
    """One run of the scenario; :meth:`run` returns a :class:`DemoResult`."""

    def __init__(
        self, opts: DemoOptions, *, on_step: Callable[[DemoStep], None] | None = None
    ) -> None:
        self.opts = opts
        self.run_id = secrets.token_hex(4)
        self.name = f"tb-demo-{self.run_id}"
        self.work = opts.workdir / self.name
        self.images = self.work / "images"
        self.denied = self.work / "denied"
        self.audit = self.work / "audit.jsonl"
        self.console_log = self.work / "console.log"
        self.layout = DiskLayout()
        self.on_step = on_step
        self.steps: list[DemoStep] = []
        self.synced: list[int] = []
        self.writer_done = False
        self.console: Console | None = None
        self.serve_proc: subprocess.Popen[str] | None = None
        self.daemons: Daemons | None = None
        self.qemu_user: str | None = None
        self.pty_fd: int | None = None
        self.top: Path | None = None
        self.report: ChainReport | None = None
        self._virsh_seconds = 0.0

    # -- bookkeeping --------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return Mode.SUPERVISE if self.opts.supervise else Mode.HOOK

    def _audit_counts(self) -> tuple[int, int]:
        """Audit records so far: all, and those for files in the demo's directory."""
        if not self.audit.exists():
            return 0, 0
        records = read_audit(self.audit)
        mine = str(self.work) + "/"
        return len(records), sum(1 for r in records if r.path.startswith(mine))

    def _audit_count(self) -> int:
        return self._audit_counts()[0]

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[dict[str, str]]:
        """Time a step, count the broker requests it caused, record ok or the error."""
        note: dict[str, str] = {"detail": ""}
        (before, images_before), t0 = self._audit_counts(), time.monotonic()
        self._virsh_seconds = 0.0
        error: str | None = None
        try:
            yield note
        except (TestbedError, OSError, ValueError) as err:
            error = str(err)
        seconds = time.monotonic() - t0
        after, images_after = self._audit_counts()
        step = DemoStep(
            name=name,
            ok=error is None,
            error=error,
            seconds=seconds,
            virsh_seconds=self._virsh_seconds,
            broker_requests=after - before,
            image_requests=images_after - images_before,
            detail=note["detail"],
        )
        self.steps.append(step)
        if self.on_step is not None:
            self.on_step(step)
        if error is not None:
            # already recorded as a failed step; this ends the run
            raise LibvirtError(f"step {name!r}: {error}")

    def virsh(self, *args: str, timeout: float | None = None) -> str:
        """``virsh ARGS``, its time added to the current step's ``virsh_seconds``."""
        t0 = time.monotonic()
        try:
            return _virsh.virsh(*args, timeout=timeout or self.opts.step_timeout)
        finally:
            self._virsh_seconds += time.monotonic() - t0

    # -- the guest's records --------------------------------------------------

    @property
    def con(self) -> Console:
        if self.console is None:
            raise LibvirtError("the guest console is not open")
        return self.console

    def pump(self, window: float = 0.2) -> None:
        """Take in the SYNCED lines that arrive within ``window`` seconds."""
        deadline = time.monotonic() + window
        while not self.writer_done:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                index = self.con.child.expect(
                    [SYNCED, r"WRITER DONE", r"WRITE FAILED[^\r\n]*", pexpect.TIMEOUT, pexpect.EOF],
                    timeout=left,
                )
            except OSError:  # the pty's other side went away (QEMU exited)
                index = 4
            if index == 0:
                self.synced.append(int(self.con.child.match.group(1)))
            elif index == 1:
                self.writer_done = True
            elif index == 2:
                raise LibvirtError(f"the guest's writer failed: {self.con.child.match.group(0)}")
            elif index == 3:
                return
            else:
                raise LibvirtError("the guest console closed while the guest wrote")

    def more_records(self, count: int) -> None:
        """Let ``count`` more records be synced (the guest keeps writing)."""
        want = (self.synced[-1] if self.synced else -1) + count
        deadline = time.monotonic() + self.opts.step_timeout
        while not self.synced or self.synced[-1] < want:
            if self.writer_done:
                raise LibvirtError(f"the guest's writer ended before record {want}")
            if time.monotonic() > deadline:
                raise LibvirtError(f"record {want} was not synced") from WaitTimeout(
                    f"the guest to sync record {want}", self.opts.step_timeout
                )
            self.pump(0.5)

    # -- steps --------------------------------------------------------------

    def domain(self, emulator: Path, *, name: str | None = None) -> DomainConfig:
        if self.top is None:
            raise LibvirtError("the demo's disk is not made yet")
        where = Installed(prefix=self.opts.prefix)
        uid, _ = qemu_ids(QEMU_USER)
        return DomainConfig(
            name=name or self.name,
            emulator=emulator,
            kernel=where.kernel,
            initrd=where.initrd,
            disk=self.top,
            create_dirs=(self.images,),
            # supervised, QEMU's reads of -kernel/-initrd are opens the supervisor serves
            ro_paths=(where.kernel, where.initrd) if self.opts.supervise else (),
            peer_uid=uid,
        )

    def start_serve(self, policy: Path) -> None:
        argv = [sys.executable, "-m", "testbed", "-v", "libvirt", "serve", self.name]
        argv += ["--policy", str(policy), "--audit", str(self.audit), "--timeout", "120"]
        if self.opts.supervise:
            argv.append("--supervise")
        log_file = (self.work / "broker.log").open("w")
        self.serve_proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file, text=True
        )
        log_file.close()
        if self.serve_proc.stdout is None:  # pragma: no cover - stdout=PIPE above
            raise LibvirtError("testbed libvirt serve has no stdout pipe")
        ready, _, _ = select.select([self.serve_proc.stdout], [], [], 30)
        line = self.serve_proc.stdout.readline() if ready else ""
        if not line.startswith("serving"):
            raise LibvirtError(
                f"testbed libvirt serve {self.name} did not start: "
                + (self.work / "broker.log").read_text()[-2000:]
            )

    def open_console(self) -> None:
        pty = self.virsh("ttyconsole", self.name, timeout=30).strip()
        if not pty.startswith("/dev/pts/"):
            raise LibvirtError(f"virsh ttyconsole {self.name} gave {pty!r}, not a pty")
        fd = os.open(pty, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)
        self.pty_fd = fd
        child = fdspawn(fd, encoding="utf-8", codec_errors="replace")
        self.console = Console(child, self.console_log)

    def run(self) -> DemoResult:
        opts = self.opts
        error: str | None = None
        mode = str(self.mode)
        try:
            self._run_steps()
        except TestbedError as err:
            error = str(err)
        finally:
            self._clean_up()
        report = self.report
        result = DemoResult(
            domain=self.name,
            qemu_version=opts.qemu_version,
            mode=mode,
            steps=tuple(self.steps),
            records_written=len(self.synced),
            records_verified=report.verified if report else 0,
            lost=len(report.lost) if report else len(self.synced),
            broker_requests=self._audit_counts()[0],
            image_requests=self._audit_counts()[1],
            qemu_user=self.qemu_user,
            console_log=str(self.console_log),
            audit_log=str(self.audit),
            error=error,
        )
        if result.ok and not opts.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        return result

    def _run_steps(self) -> None:
        """The demo's steps, each a ``with self.step(...)`` block.

        Long because it is the demo's script, read top to bottom in the order the steps
        run; each step is a few lines and shares ``opts`` and the domain with the next.
        """
        opts = self.opts
        with self.step("daemons") as note:
            self.daemons = Daemons(state_dir=opts.workdir / "daemons").start()
            started = ", ".join(self.daemons.started) or "none"
            found = ", ".join(self.daemons.found) or "none"
            note["detail"] = f"started: {started}; already running: {found}"
        with self.step("install") as note:
            where = install(prefix=opts.prefix, versions=[opts.qemu_version])
            wrapper = where.wrapper(opts.qemu_version, self.mode)
            qemu = where.mode_qemu(opts.qemu_version, self.mode)
            if not wrapper.is_file():
                raise LibvirtError(
                    f"no {self.mode} wrapper for QEMU {opts.qemu_version}: {qemu} is not there "
                    f"(run `make qemu QEMU_VERSIONS={opts.qemu_version}`)"
                )
            note["detail"] = f"{wrapper} -> {qemu}"
        with self.step("disk") as note:
            traversable_dir(self.work, 0o755)
            traversable_dir(self.images)
            traversable_dir(self.denied)
            disk = make_disk(self.images, "qcow2", run=self.run_id, layout=self.layout)
            os.chown(disk.path, 0, 0)
            os.chmod(disk.path, 0o600)
            self.top = disk.path
            note["detail"] = f"{disk.path} (root, 0600)"
        control = "supervisor" if opts.supervise else "hook"
        with self.step(f"start without the {control} (must fail)") as note:
            # The domain's own XML, but QEMU itself as the emulator: no broker.
            bare = self.domain(qemu, name=f"{self.name}-no{control}")
            xml = self.work / "nohook.xml"
            xml.write_text(domain_xml(bare))
            try:
                self.virsh("create", str(xml), timeout=opts.step_timeout)
            except LibvirtError as err:
                if "Permission denied" not in str(err):
                    raise
                note["detail"] = _last_line(str(err))
            else:
                self.virsh("destroy", bare.name, timeout=60)
                raise LibvirtError("QEMU without the hook opened the image: it is not confined")
        with self.step("define") as note:
            files = define(self.domain(wrapper), self.work)
            note["detail"] = f"{files.xml} + {files.policy}"
        with self.step("start") as note:
            self.start_serve(files.policy)
            self.virsh("create", str(files.xml), "--paused", timeout=opts.step_timeout)
            pid, self.qemu_user = qemu_process_user(self.name)
            self.open_console()
            self.virsh("resume", self.name, timeout=60)
            self.con.expect("boot", r"TESTBED-GUEST: ready", timeout=opts.boot_timeout)
            self.con.expect("shell", PROMPT, timeout=opts.step_timeout, record=False)
            note["detail"] = f"QEMU pid {pid} runs as {self.qemu_user}"
            if opts.supervise:
                note["detail"] += "; " + confinement_of(pid)
            if self.qemu_user == "root":
                raise LibvirtError("QEMU runs as root: qemu.conf must name an unprivileged user")
        with self.step("pattern") as note:
            m = self.con.command(
                "pattern",
                f"tb pattern {self.layout.pattern_sectors}",
                r"PATTERN ([0-9a-f]{64})",
                timeout=opts.step_timeout,
            )
            want = pattern_digest(self.run_id, self.layout)
            if m.group(1) != want:
                raise LibvirtError(f"guest read sha256 {m.group(1)}, host wrote {want}")
            note["detail"] = f"sha256 {want[:16]}..."
        count = min(opts.records, self.layout.max_records)
        self.con.child.sendline(f"tb write {self.layout.record_start} 0 {count} {self.run_id}")
        with self.step("writer") as note:
            self.more_records(opts.between)
            note["detail"] = f"{len(self.synced)} records synced"
        self.snapshot("snapshot", self.images / "snap1.qcow2")
        with self.step("blockcommit --active --pivot") as note:
            self.virsh("blockcommit", self.name, "vda", "--active", "--pivot", "--wait",
                  timeout=opts.step_timeout)  # fmt: skip
            self.expect_top(self.images / "disk.qcow2", note)
        copy = self.images / "copy.qcow2"
        with self.step("blockcopy --pivot") as note:
            self.virsh("blockcopy", self.name, "vda", str(copy), "--format", "qcow2", "--pivot",
                  "--wait", "--transient-job", timeout=opts.step_timeout)  # fmt: skip
            self.expect_top(copy, note)
        snap2 = self.images / "snap2.qcow2"
        self.snapshot("snapshot 2 (for blockpull)", snap2)
        with self.step("blockpull") as note:
            self.virsh("blockpull", self.name, "vda", "--wait", timeout=opts.step_timeout)
            self.expect_top(snap2, note)
        self.refused_snapshot()
        with self.step("destroy while writing") as note:
            self.pump(0.1)
            if self.writer_done:
                raise LibvirtError("the guest's writer had finished before destroy")
            before = len(self.synced)
            self.virsh("destroy", self.name, timeout=opts.step_timeout)
            with contextlib.suppress(LibvirtError):
                self.pump(2.0)  # SYNCED lines still in the pty, then EOF
            self.writer_done = True
            note["detail"] = f"{before} records synced before destroy, {len(self.synced)} in all"
        with self.step("broker exited") as note:
            if self.serve_proc is None:
                raise LibvirtError("no broker was started")
            try:
                status = self.serve_proc.wait(15)
            except subprocess.TimeoutExpired as err:
                raise LibvirtError("the domain's broker is still running after destroy") from err
            note["detail"] = f"exit status {status}"
        with self.step("verify") as note:
            report = check_chain(
                base=snap2,
                base_format="qcow2",
                marks=(),
                synced=self.synced,
                layout=self.layout,
                run=self.run_id,
            )
            self.report = report
            note["detail"] = f"{report.verified}/{report.synced} synced records in {snap2.name}"
            if report.problems:
                raise LibvirtError("; ".join(report.problems))

    def snapshot(self, step: str, overlay: Path) -> None:
        with self.step(step) as note:
            self.virsh("snapshot-create-as", self.name, overlay.stem, "--disk-only", "--atomic",
                  "--no-metadata", "--diskspec", f"vda,snapshot=external,file={overlay}",
                  timeout=self.opts.step_timeout)  # fmt: skip
            self.expect_top(overlay, note)

    def expect_top(self, path: Path, note: dict[str, str]) -> None:
        """The disk's active layer is ``path`` now; then let a few records through."""
        top = disk_sources(self.name).get("vda")
        if top != str(path):
            raise LibvirtError(f"vda is {top}, expected {path}")
        self.top = path
        self.more_records(self.opts.between)
        note["detail"] = f"vda is {path.name}; last synced record {self.synced[-1]}"

    def refused_snapshot(self) -> None:
        overlay = self.denied / "snap3.qcow2"
        with self.step("snapshot into an ungranted directory (must fail)") as note:
            before = self._audit_count()
            try:
                self.virsh("snapshot-create-as", self.name, overlay.stem, "--disk-only", "--atomic",
                      "--no-metadata", "--diskspec", f"vda,snapshot=external,file={overlay}",
                      timeout=self.opts.step_timeout)  # fmt: skip
            except LibvirtError as err:
                if "Permission denied" not in str(err):
                    raise
                said = _last_line(str(err))
            else:
                raise LibvirtError(f"the snapshot into {self.denied} succeeded")
            refused = [
                r for r in read_audit(self.audit)[before:] if r.path.startswith(str(self.denied))
            ]
            if not refused or any(r.result >= 0 for r in refused):
                raise LibvirtError(f"the broker did not refuse {overlay}: {refused}")
            left = list(self.denied.iterdir())
            if left:
                raise LibvirtError(f"libvirt left {left} behind after the failed snapshot")
            if self.top is None:
                raise LibvirtError("the disk's active layer is unknown")
            self.expect_top(self.top, note)
            note["detail"] = f"{said}; rolled back, {note['detail']}"

    def _clean_up(self) -> None:
        with contextlib.suppress(TestbedError, OSError):
            if domain_exists(self.name):
                self.virsh("destroy", self.name, timeout=60)
        if self.serve_proc is not None and self.serve_proc.poll() is None:
            self.serve_proc.kill()
            self.serve_proc.wait(10)
        if self.console is not None:
            self.console.close()
        if self.pty_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pty_fd)
        if self.daemons is not None:
            for line in self.daemons.stop():
                log.info("%s", line)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    tail = lines[-1] if lines else text
    m = re.search(r"Could not open [^\n]*", tail)
    return m.group(0) if m else tail[-200:]


def run_demo(opts: DemoOptions, *, on_step: Callable[[DemoStep], None] | None = None) -> DemoResult:
    return Demo(opts, on_step=on_step).run()


__all__ = ["DemoOptions", "DemoResult", "DemoStep", "run_demo"]
