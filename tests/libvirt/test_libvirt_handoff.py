"""The supervised mode without libvirt: the wrapper, as libvirt-qemu, confined by
``testbed libvirt serve --supervise`` (root), execs stock QEMU; every open is served.

Each test runs the wrapper the way libvirt does (``setpriv`` to libvirt-qemu,
our own fd and environment variable standing for libvirt's monitor fd and
environment) against a ``serve`` it starts and must see end.
"""

from __future__ import annotations

import os
import pwd
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.broker import read_audit
from testbed.libvirt import install as inst
from testbed.libvirt.install import KNOWN_VERSIONS, stock_source
from testbed.pytest_plugin import require
from testbed.qemu.binaries import is_runnable

pytestmark = pytest.mark.libvirt

QEMU_USER = "libvirt-qemu"
#: Beneath a world-searchable directory: libvirt-qemu must reach the wrapper and the images.
ROOT = Path("/var/lib/testbed/libvirt/tests-handoff")
#: As libvirt passes it.  Without it, a relocatable build (10.0) asks for
#: BINDIR/../etc/qemu/qemu.conf, which no grant covers: EACCES, fatal.
NO_USER_CONFIG = "-no-user-config"


def stock_versions() -> list[str]:
    return [v for v in KNOWN_VERSIONS if is_runnable(stock_source(v))]


@dataclass(frozen=True)
class Prefix:
    root: Path
    #: version -> the stock QEMU its wrapper execs
    qemu: dict[str, Path]

    def wrapper(self, version: str) -> Path:
        return self.root / "bin" / f"qemu-{version}-supervise"


@pytest.fixture(scope="module")
def prefix() -> Iterator[Prefix]:
    require(shutil.which("setpriv") is not None, "setpriv (util-linux)")
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        require(False, f"user {QEMU_USER} (scripts/deps.sh libvirt)")
    root = ROOT / secrets.token_hex(3)
    root.mkdir(parents=True)
    for d in (ROOT, root):
        os.chmod(d, 0o755)
    inst._copy_package(root / "lib")
    where = Prefix(root, {})
    for version in stock_versions():
        qemu = stock_source(version)
        if not str(qemu).startswith("/usr/"):  # a build under root's cache: copy it out
            inst._copy(qemu, root / "qemu" / version / "qemu-system-x86_64", 0o755)
            qemu = root / "qemu" / version / "qemu-system-x86_64"
        text = inst.WRAPPER.format(
            version=version, mode="supervise", lib=str(root / "lib"), qemu=str(qemu)
        )
        inst._write(where.wrapper(version), text, 0o755)
        where.qemu[version] = qemu
    yield where
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def workdir(prefix: Prefix) -> Iterator[Path]:
    d = prefix.root / "work" / secrets.token_hex(3)
    d.mkdir(parents=True)
    os.chmod(d.parent, 0o755)
    os.chmod(d, 0o711)  # libvirt-qemu may traverse, not list or open
    yield d
    shutil.rmtree(d, ignore_errors=True)


def root_only_image(directory: Path) -> Path:
    image = directory / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    os.chmod(image, 0o600)
    return image


def start_serve(name: str, policy: Path | None, audit: Path) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "testbed", "-v", "libvirt", "serve", name, "--supervise",
            "--audit", str(audit), "--timeout", "30"]  # fmt: skip
    if policy is not None:
        argv += ["--policy", str(policy)]
    serve = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=audit.parent
    )
    assert serve.stdout is not None
    if policy is not None:
        assert select.select([serve.stdout], [], [], 30)[0], "serve did not start"
        assert serve.stdout.readline().startswith("serving"), serve.stderr
    return serve


def as_qemu_user(argv: list[str], **kw: object) -> subprocess.Popen[str]:
    words = ["setpriv", f"--reuid={QEMU_USER}", f"--regid={QEMU_USER}", "--clear-groups", *argv]
    return subprocess.Popen(words, text=True, **kw)  # type: ignore[call-overload, no-any-return]


def grant(directory: Path, access: str = "create") -> Path:
    policy = directory / "policy.toml"
    policy.write_text(f'[[grant]]\npath = "{directory}"\naccess = "{access}"\n')
    os.chmod(policy, 0o600)
    return policy


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def wait_for(what: str, condition: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def stop(*procs: subprocess.Popen[str] | None) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("version", stock_versions() or ["7.2"])
def test_stock_qemu_opens_a_root_only_image_only_through_its_supervisor(
    prefix: Prefix, workdir: Path, version: str
) -> None:
    require(version in stock_versions(), f"stock QEMU {version} (run `make qemu`)")
    name = f"tb-ho-{secrets.token_hex(3)}"
    image = root_only_image(workdir)
    audit = workdir / "audit.jsonl"
    serve = start_serve(name, grant(workdir), audit)
    qemu = None
    try:
        keep_r, keep_w = os.pipe()  # stands for libvirt's monitor fd
        wrapper = str(prefix.wrapper(version))
        qemu = as_qemu_user(
            [wrapper, "-name", f"guest={name}", "-machine", "none", "-nodefaults", NO_USER_CONFIG,
             "-display", "none", "-S",
             "-blockdev", f"driver=file,filename={image},node-name=f",
             "-blockdev", "driver=qcow2,file=f,node-name=q"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            pass_fds=(keep_r,), env={**os.environ, "TB_FROM_LIBVIRT": "yes"},
        )  # fmt: skip
        os.close(keep_r)
        os.close(keep_w)

        def image_opened() -> bool:
            assert qemu is not None and qemu.poll() is None, qemu.stderr.read()  # type: ignore[union-attr]
            return audit.exists() and any(r.path == str(image) for r in read_audit(audit))

        wait_for("QEMU's open of the image", image_opened)
        records = read_audit(audit)
        mine = [r for r in records if r.path == str(image)]
        assert mine and all(r.result == 0 and r.via == "seccomp" for r in mine), mine
        # every open is served, ld.so's first ones too
        assert len(records) > 5
        assert any(r.path.endswith("libc.so.6") for r in records)
        # the wrapper became QEMU: same pid, argv[0], fds and environment; confined
        pid = mine[0].peer_pid
        assert os.readlink(f"/proc/{pid}/exe") == os.path.realpath(prefix.qemu[version])
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == wrapper.encode()
        assert os.readlink(f"/proc/{pid}/fd/{keep_r}").startswith("pipe:")
        assert b"TB_FROM_LIBVIRT=yes" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        st = status(pid)
        assert st["Uid"].split()[0] == str(pwd.getpwnam(QEMU_USER).pw_uid)
        assert (st["NoNewPrivs"], st["Seccomp"]) == ("1", "2")
        # killing QEMU ends its supervisor
        assert serve.poll() is None
        os.kill(pid, signal.SIGKILL)
        assert serve.wait(15) == 0
    finally:
        stop(qemu, serve)


@pytest.mark.parametrize("version", stock_versions() or ["7.2"])
def test_landlock_denies_what_the_supervisor_does_not_see(
    prefix: Prefix, workdir: Path, version: str
) -> None:
    """bind(2) of a UNIX socket is no open: DAC allows it here (a 0777 directory),
    Landlock does not.  Without the wrapper, the same QEMU binds it."""
    require(version in stock_versions(), f"stock QEMU {version} (run `make qemu`)")
    open_dir = workdir / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    name = f"tb-ll-{secrets.token_hex(3)}"
    audit = workdir / "audit.jsonl"
    args = ["-machine", "none", "-nodefaults", NO_USER_CONFIG, "-display", "none", "-S", "-chardev",
            f"socket,id=c0,path={open_dir}/q.sock,server=on,wait=off"]  # fmt: skip
    serve = start_serve(name, grant(workdir), audit)
    confined = plain = None
    try:
        confined = as_qemu_user(
            [str(prefix.wrapper(version)), "-name", f"guest={name}", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, err = confined.communicate(timeout=60)
        assert confined.returncode != 0
        assert "Permission denied" in err and "q.sock" in err, err
        assert not (open_dir / "q.sock").exists()
        assert serve.wait(15) == 0  # and its supervisor is gone with it
        assert len(read_audit(audit)) > 5  # it was served up to there
        # the control: no wrapper, same user, same binary
        plain = as_qemu_user(
            [str(prefix.qemu[version]), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        wait_for("unconfined QEMU to bind its socket", lambda: (open_dir / "q.sock").exists())
    finally:
        stop(confined, plain, serve)


def test_without_a_policy_file_nothing_starts(prefix: Prefix, workdir: Path) -> None:
    versions = stock_versions()
    require(bool(versions), "a stock QEMU (Debian's qemu-system-x86 or `make qemu`)")
    name = f"tb-np-{secrets.token_hex(3)}"
    serve = start_serve(name, None, workdir / "audit.jsonl")  # ./NAME.policy.toml: none
    _, err = serve.communicate(timeout=30)
    assert serve.returncode == 1
    assert f"no policy file {name}.policy.toml" in err
    qemu = as_qemu_user(
        [str(prefix.wrapper(versions[0])), "-name", f"guest={name}", "-machine", "none"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, err = qemu.communicate(timeout=60)
    assert qemu.returncode == 1
    assert f"no supervisor socket at /run/testbed/libvirt/{name}.sock" in err
    assert f"`testbed libvirt serve {name} --supervise`" in err


def test_a_refused_hand_off_leaves_nothing_behind(prefix: Prefix, workdir: Path) -> None:
    versions = stock_versions()
    require(bool(versions), "a stock QEMU (Debian's qemu-system-x86 or `make qemu`)")
    name = f"tb-rf-{secrets.token_hex(3)}"
    # a wrapper whose QEMU does not exist: the supervisor cannot build its ruleset
    broken = prefix.root / "bin" / f"broken-{name}"
    inst._write(
        broken,
        inst.WRAPPER.format(
            version="x", mode="supervise", lib=str(prefix.root / "lib"), qemu="/nonexistent/qemu"
        ),
        0o755,
    )
    serve = start_serve(name, grant(workdir), workdir / "audit.jsonl")
    qemu = as_qemu_user(
        [str(broken), "-name", f"guest={name}", "-machine", "none"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _, err = qemu.communicate(timeout=60)
        assert qemu.returncode == 1
        assert "the supervisor refused" in err and "/nonexistent/qemu" in err, err
        assert serve.wait(15) == 1
    finally:
        stop(qemu, serve)
        broken.unlink(missing_ok=True)
