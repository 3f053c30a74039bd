"""The pure parts: the BPF program, call decoding, names, the system profile, feature checks."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
from pathlib import Path

import pytest

from testbed.broker import Access
from testbed.errors import KernelFeatureError, PolicyError
from testbed.supervise import bpf, landlock, load_profile, seccomp
from testbed.supervise.command import register
from testbed.supervise.notify import decode
from testbed.supervise.profile import builtin_profiles
from testbed.supervise.seccomp import SeccompNotif
from testbed.supervise.target import TargetError, normalise, rewrite_proc_self

I386 = 0x40000003


@pytest.mark.parametrize(
    ("nr", "arch", "want"),
    [
        (bpf.NR_OPEN, bpf.AUDIT_ARCH_X86_64, bpf.SECCOMP_RET_USER_NOTIF),
        (bpf.NR_OPENAT, bpf.AUDIT_ARCH_X86_64, bpf.SECCOMP_RET_USER_NOTIF),
        (bpf.NR_OPENAT2, bpf.AUDIT_ARCH_X86_64, bpf.SECCOMP_RET_USER_NOTIF),
        (bpf.NR_CREAT, bpf.AUDIT_ARCH_X86_64, bpf.SECCOMP_RET_USER_NOTIF),
        (0, bpf.AUDIT_ARCH_X86_64, bpf.SECCOMP_RET_ALLOW),  # read
        (5, bpf.AUDIT_ARCH_X86_64, bpf.SECCOMP_RET_ALLOW),  # fstat
        (5, I386, bpf.SECCOMP_RET_KILL_PROCESS),  # i386 open
        (bpf.NR_OPENAT | bpf.X32_SYSCALL_BIT, bpf.AUDIT_ARCH_X86_64, bpf.SECCOMP_RET_KILL_PROCESS),
        (bpf.NR_OPEN_BY_HANDLE_AT, bpf.AUDIT_ARCH_X86_64, bpf.SECCOMP_RET_ERRNO | errno.EPERM),
        (bpf.NR_IO_URING_SETUP, bpf.AUDIT_ARCH_X86_64, bpf.SECCOMP_RET_ERRNO | errno.ENOSYS),
        (bpf.NR_IO_URING_ENTER, bpf.AUDIT_ARCH_X86_64, bpf.SECCOMP_RET_ERRNO | errno.ENOSYS),
    ],
)
def test_filter_decisions(nr: int, arch: int, want: int) -> None:
    assert bpf.run(bpf.open_filter(), nr=nr, arch=arch) == want


def test_assembler_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match="undefined label"):
        bpf.assemble([bpf.jeq(1, then="nowhere"), bpf.ret(0)])
    with pytest.raises(ValueError, match="defined twice"):
        bpf.assemble(["a", bpf.ret(0), "a", bpf.ret(0)])


def notif(nr: int, *args: int) -> SeccompNotif:
    n = SeccompNotif()
    n.pid = os.getpid()
    n.data.nr = nr
    n.data.arch = bpf.AUDIT_ARCH_X86_64
    for i, a in enumerate(args):
        n.data.args[i] = a
    return n


def test_decode_masks_flags_as_open_does() -> None:
    # unknown bits ignored, the mode only counts with O_CREAT, dirfd sign-extended
    call = decode(notif(bpf.NR_OPENAT, 0xFFFFFF9C, 0x1000, os.O_RDONLY | 0x80000000, 0o644))
    assert call.dirfd == -100 and call.flags == os.O_RDONLY and call.mode == 0
    call = decode(notif(bpf.NR_OPEN, 0x1000, os.O_RDWR | os.O_CREAT, 0o104755))
    assert call.flags == os.O_RDWR | os.O_CREAT and call.mode == 0o4755
    call = decode(notif(bpf.NR_CREAT, 0x1000, 0o600))
    assert call.flags == os.O_CREAT | os.O_WRONLY | os.O_TRUNC and call.mode == 0o600
    # O_PATH keeps only the flags O_PATH honours
    call = decode(notif(bpf.NR_OPEN, 0x1000, os.O_PATH | os.O_RDWR | os.O_TRUNC, 0))
    assert call.flags == os.O_PATH


def test_decode_unknown_call_is_enosys() -> None:
    with pytest.raises(TargetError) as err:
        decode(notif(0))
    assert err.value.errno == errno.ENOSYS


@pytest.mark.parametrize(
    ("path", "want"),
    [
        ("/proc/self/status", "/proc/42/status"),
        ("/proc/self", "/proc/42"),
        ("/proc/thread-self/stat", "/proc/42/task/43/stat"),
        ("/proc/selfish", "/proc/selfish"),
        ("/etc/passwd", "/etc/passwd"),
    ],
)
def test_proc_self_rewriting(path: str, want: str) -> None:
    assert rewrite_proc_self(path, tgid=42, tid=43) == want


@pytest.mark.parametrize(
    ("path", "want"),
    [("//a/./b", "/a/b"), ("/a/../b", "/a/../b"), ("/a/b/", "/a/b/"), ("/", "/")],
)
def test_normalise_keeps_dotdot_and_trailing_slash(path: str, want: str) -> None:
    assert normalise(path) == want


def test_builtin_profile_loads_and_resolves_symlinks() -> None:
    assert "qemu" in builtin_profiles()
    prof = load_profile("qemu")
    assert prof.proc_self
    assert prof.covers("/etc/qemu/qemu.conf")
    resolved = {g.path for g in prof.policy.grants}
    assert os.path.realpath("/etc/localtime") in resolved
    rules = dict(prof.landlock_rules())
    assert rules["/dev/kvm"] & landlock.FS.IOCTL_DEV
    assert not rules["/usr/lib"] & landlock.FS.WRITE_FILE


def test_bad_profiles_are_named(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no such built-in system profile"):
        load_profile("nonesuch")
    bad = tmp_path / "bad.toml"
    bad.write_text('[profile]\ncolour = "red"\n')
    with pytest.raises(PolicyError, match="colour"):
        load_profile(bad)
    bad.write_text("[[grant]]\npath = 'relative'\naccess = 'ro'\n")
    with pytest.raises(PolicyError, match="not absolute"):
        load_profile(bad)
    with pytest.raises(PolicyError, match="cannot read"):
        load_profile(tmp_path / "missing.toml")


def test_missing_landlock_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_landlock(*_args: object) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(landlock, "_syscall", no_landlock)
    with pytest.raises(KernelFeatureError, match="Landlock is unavailable: not built") as err:
        landlock.abi_version()
    assert err.value.feature == "landlock"


def test_missing_wait_killable_recv_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def old_kernel(operation: int, flags: int, arg: object) -> int:
        if operation == seccomp.SECCOMP_SET_MODE_FILTER:
            raise OSError(errno.EINVAL, "Invalid argument")
        return 0

    monkeypatch.setattr(seccomp, "seccomp", old_kernel)
    with pytest.raises(KernelFeatureError, match="WAIT_KILLABLE_RECV"):
        seccomp.check_user_notification()


def test_missing_user_notification_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_notif(operation: int, flags: int, arg: object) -> int:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(seccomp, "seccomp", no_notif)
    with pytest.raises(KernelFeatureError, match="no seccomp user notification"):
        seccomp.check_user_notification()


def test_command_line_fails_clearly_without_landlock(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_landlock(*_args: object) -> int:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(landlock, "_syscall", no_landlock)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["supervise", "--landlock", "--", "true"])
    assert args.func(args) == 2
    assert "Landlock is unavailable: built in but not enabled" in capsys.readouterr().err


def test_command_line_needs_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["supervise"])
    assert args.func(args) == 2
    assert "no COMMAND" in capsys.readouterr().err


def test_policy_toml_round_trips(tmp_path: Path) -> None:
    from testbed.broker import Grant, Policy
    from testbed.broker.policy import Access
    from testbed.supervise.machine import policy_toml

    policy = Policy(
        grants=(
            Grant(path="/srv/a b", access=Access.RO, symlinks=True),
            Grant(path='/srv/"q"', access=Access.CREATE, devices=True, hardlinks=True),
        ),
        refuse_errno=errno.EPERM,
        create_mode_mask=0o700,
    )
    f = tmp_path / "p.toml"
    f.write_text(policy_toml(policy))
    assert Policy.from_toml(f) == policy


def test_profile_grants_a_builds_own_qemu_directories_only(tmp_path: Path) -> None:
    """A QEMU built with a prefix reads bin/../etc/qemu/qemu.conf: EACCES there is fatal."""
    prof = load_profile("qemu")
    assert prof.command_prefix
    build = tmp_path / "build"
    (build / "bin").mkdir(parents=True)
    (build / "bin" / "qemu-system-x86_64").touch()
    (build / "share" / "qemu").mkdir(parents=True)
    (build / "secret").touch()
    conf = build / "etc" / "qemu" / "qemu.conf"
    assert not prof.covers(str(conf))
    ours = prof.for_command(build / "bin" / "qemu-system-x86_64")
    assert ours.covers(str(conf))
    assert ours.covers(str(build / "share" / "qemu" / "bios.bin"))
    # never the whole prefix: it could hold anything
    assert not ours.covers(str(build / "secret"))
    assert not ours.covers(str(build / "bin" / "qemu-system-x86_64"))
    assert all(g.access == Access.RO for g in ours.policy.grants[-2:])
    rules = dict(ours.landlock_rules())
    assert rules[str(build / "share" / "qemu")] == landlock.FS.READ_FILE | landlock.FS.READ_DIR
    assert str(build / "etc" / "qemu") not in rules  # absent: Landlock needs a real path
    # Debian's QEMU is under /usr, which the grants already describe.
    assert prof.for_command("/usr/bin/qemu-system-x86_64") is prof
    # A command not in a bin/ directory gets nothing (its parent's parent may be /).
    (tmp_path / "tool").touch()
    assert prof.for_command(tmp_path / "tool") is prof
    # A profile that does not ask for it never grows.
    off = dataclasses.replace(prof, command_prefix=False)
    assert off.for_command(build / "bin" / "qemu-system-x86_64") is off


def test_profile_command_prefix_must_be_a_bool(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[profile]\ncommand_prefix = "yes"\n')
    with pytest.raises(PolicyError, match="command_prefix"):
        load_profile(bad)


def test_a_missing_file_reached_through_dotdot_answers_enoent_under_its_grant(
    tmp_path: Path,
) -> None:
    """10.0's stock build asks for ``bin/../etc/qemu/qemu.conf``, which does not exist:
    ENOENT (as open(2) says) under the granted etc/qemu, EACCES anywhere else."""
    from testbed.broker import Policy
    from testbed.supervise.decide import Decider

    build = tmp_path / "build"
    (build / "bin").mkdir(parents=True)
    (build / "bin" / "qemu-system-x86_64").touch()
    prof = load_profile("qemu").for_command(build / "bin" / "qemu-system-x86_64")
    decider = Decider(Policy(), prof)
    try:
        asked = f"{build}/bin/../etc/qemu/qemu.conf"
        outcome, part = decider.decide(asked, os.O_RDONLY, 0, tgid=os.getpid())
        assert (outcome.result, part) == (-errno.ENOENT, "system")
        # the same trick towards a directory no grant covers is refused, not ENOENT
        outside = f"{build}/bin/../elsewhere/qemu.conf"
        outcome, _ = decider.decide(outside, os.O_RDONLY, 0, tgid=os.getpid())
        assert outcome.result == -errno.EACCES
        # a ".." in the missing part is not resolved by hand: refused
        tricky = f"{build}/etc/missing/../../secret"
        outcome, _ = decider.decide(tricky, os.O_RDONLY, 0, tgid=os.getpid())
        assert outcome.result == -errno.EACCES
    finally:
        decider.close()


def test_a_shell_redirect_to_dev_null_is_served(tmp_path: Path) -> None:
    """`migrate uri=exec:cat >/dev/null`: the shell inherits the filter and opens
    /dev/null with O_CREAT|O_TRUNC (iotests 203, 234, 262, 280 migrate that way)."""
    from testbed.broker import Policy
    from testbed.supervise.decide import Decider

    decider = Decider(Policy(), load_profile("qemu"))
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        outcome, part = decider.decide("/dev/null", flags, 0o666, tgid=os.getpid())
        assert (outcome.result, part) == (0, "system"), outcome.reason
        assert outcome.fd is not None
        os.close(outcome.fd)
    finally:
        decider.close()


def test_the_supervisor_fits_the_profile_to_every_executable(tmp_path: Path) -> None:
    """A wrapper (stdbuf) execs QEMU: the build's qemu.conf is granted through --allow-exec."""
    from testbed.supervise import Supervisor

    build = tmp_path / "build"
    (build / "bin").mkdir(parents=True)
    qemu = build / "bin" / "qemu-system-x86_64"
    qemu.touch()
    qemu.chmod(0o755)
    sup = Supervisor(exec_paths=[qemu], keep_records=False)
    try:
        assert sup.profile is not None
        conf = str(build / "etc" / "qemu" / "qemu.conf")
        assert not sup.profile.covers(conf)
        sup._fit_profile("stdbuf", None)
        assert sup.profile.covers(conf)
    finally:
        sup.close()
