"""The command line built from a MachineConfig (no QEMU needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.qemu.commandline import FIRMWARE_DIRS, MachineConfig, build_argv, hide_prefix


def test_default_argv_has_firmware_qmp_and_tcg() -> None:
    argv = build_argv(MachineConfig(line_buffered=False), qmp_fd=7)
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    for fw in FIRMWARE_DIRS:
        i = argv.index(str(fw))
        assert argv[i - 1] == "-L"
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert argv[argv.index("-machine") + 1] == "none"
    assert "socket,id=qmp,fd=7" in argv
    assert argv[argv.index("-mon") + 1] == "chardev=qmp,mode=control"
    assert "-open-hook-fd" not in argv
    assert "-serial" not in argv


def test_hook_serial_and_user_args_come_in_order() -> None:
    cfg = MachineConfig(
        binary=Path("/x/qemu"),
        hook=True,
        serial=True,
        accel="kvm",
        args=("-m", "256", "-kernel", "/k"),
    )
    argv = build_argv(cfg, qmp_fd=5, hook_fd=6, serial_fd=9)
    assert argv[argv.index("-open-hook-fd") + 1] == "6"
    assert "socket,id=ser0,fd=9" in argv
    assert argv[argv.index("-serial") + 1] == "chardev:ser0"
    assert argv[-4:] == ["-m", "256", "-kernel", "/k"]
    assert argv[argv.index("-accel") + 1] == "kvm"


def test_hook_fd_must_match_the_config() -> None:
    with pytest.raises(ValueError, match="hook_fd"):
        build_argv(MachineConfig(hook=True), qmp_fd=5)
    with pytest.raises(ValueError, match="hook_fd"):
        build_argv(MachineConfig(), qmp_fd=5, hook_fd=6)
    with pytest.raises(ValueError, match="serial_fd"):
        build_argv(MachineConfig(serial=True), qmp_fd=5)


def test_hidden_dirs_wrap_qemu_in_unshare_and_wrapper_goes_first() -> None:
    cfg = MachineConfig(
        hide_dirs=(Path("/srv/a"), Path("/srv/b")), wrapper=("strace", "-f"), line_buffered=False
    )
    argv = build_argv(cfg, qmp_fd=5)
    assert argv[:4] == ["strace", "-f", "unshare", "--mount"]
    dashdash = argv.index("--")
    assert argv[dashdash - 2 : dashdash] == ["/srv/a", "/srv/b"]
    assert argv[dashdash + 1] == "/usr/bin/qemu-system-x86_64"
    assert hide_prefix((Path("/srv/a"),))[-2:] == ["/srv/a", "--"]


def test_line_buffered_runs_qemu_under_stdbuf() -> None:
    argv = build_argv(MachineConfig(), qmp_fd=5)
    assert argv[:4] == ["stdbuf", "-oL", "-eL", "/usr/bin/qemu-system-x86_64"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"accel": "hvf"}, "accel"),
        ({"launch_timeout": 0}, "launch_timeout"),
        ({"hide_dirs": (Path("relative"),)}, "absolute"),
        ({"pass_fds": (2,)}, "stdin, stdout or stderr"),
        ({"hide_dirs": (Path("/usr/share"),)}, "firmware directory"),
    ],
)
def test_bad_configs_say_what_is_wrong(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MachineConfig(**fields)  # type: ignore[arg-type]


def test_config_is_frozen_and_keyword_only() -> None:
    cfg = MachineConfig()
    with pytest.raises(AttributeError):
        cfg.accel = "kvm"  # type: ignore[misc]
    with pytest.raises(TypeError):
        MachineConfig(Path("/x"))  # type: ignore[misc]
