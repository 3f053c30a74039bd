"""``testbed qemu``: find the binaries, and run QEMU by hand against a broker.

``testbed qemu info`` says which binaries exist, their versions and the build
cache key.  ``testbed qemu run`` starts an in-process broker with the given
grants, runs the patched QEMU with ``-open-hook-fd`` on a socket pair (or the
stock one without it), with QEMU's terminal I/O left alone, so ``-nographic``
or ``-serial mon:stdio`` work, and prints what the broker answered.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path
from typing import Any

from testbed.broker import Policy, serve_socketpair
from testbed.errors import BuildError
from testbed.qemu.binaries import (
    STOCK_QEMU,
    cache_key,
    is_runnable,
    open_hook_server_path,
    patched_qemu_path,
)
from testbed.qemu.commandline import FIRMWARE_DIRS, hide_prefix

EPILOG = """\
examples:
  testbed qemu info
  testbed qemu run --allow-create /srv/vm --hide /srv/vm -- \\
      -nographic -m 256 -drive file=/srv/vm/disk.qcow2,if=virtio
  testbed qemu run --stock -- -machine none -monitor stdio
"""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "qemu",
        help="the patched QEMU: what is built, and running it against a broker",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    qsub = p.add_subparsers(dest="qemu_command", metavar="ACTION", required=True)

    info = qsub.add_parser("info", help="which QEMU binaries are found, and the cache key")
    info.set_defaults(func=run_info)

    run = qsub.add_parser("run", help="run QEMU with -open-hook-fd served by a broker")
    run.add_argument(
        "--stock", action="store_true", help="run Debian's QEMU without the hook (no broker)"
    )
    run.add_argument("--binary", type=Path, help="QEMU binary (default: the patched build)")
    run.add_argument("--allow-ro", action="append", default=[], metavar="PATH")
    run.add_argument("--allow-rw", action="append", default=[], metavar="PATH")
    run.add_argument("--allow-create", action="append", default=[], metavar="DIR")
    run.add_argument("--policy", type=Path, metavar="FILE", help="a broker TOML policy")
    run.add_argument(
        "--audit", type=Path, metavar="FILE", help="write the broker's answers as JSON lines"
    )
    run.add_argument(
        "--hide",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="run QEMU in a mount namespace where DIR is an empty tmpfs",
    )
    run.add_argument("qemu_args", nargs=argparse.REMAINDER, metavar="-- QEMU ARGS")
    run.set_defaults(func=run_qemu)


def _version(binary: Path) -> str:
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return f"cannot run: {err}"
    return out.splitlines()[0] if out else "no version output"


def run_info(args: argparse.Namespace) -> int:
    for label, path in (
        ("stock", STOCK_QEMU),
        ("patched", patched_qemu_path()),
        ("open-hook-server", open_hook_server_path()),
    ):
        if is_runnable(path):
            detail = _version(path) if label != "open-hook-server" else "present"
            print(f"{label:17} {path} -> {path.resolve()}\n{'':17} {detail}")
        else:
            hint = " (run `make qemu`)" if label != "stock" else ""
            print(f"{label:17} {path}: missing{hint}")
    try:
        key = cache_key()
    except BuildError as err:
        key = f"unknown ({err})"
    built = patched_qemu_path().resolve().parent.parent.name
    state = "built" if key == built else "not built yet (or stale)"
    print(f"{'cache key':17} {key}: {state}")
    return 0


def run_qemu(args: argparse.Namespace) -> int:
    qemu_args = list(args.qemu_args)
    if qemu_args[:1] == ["--"]:
        qemu_args = qemu_args[1:]
    binary = args.binary or (STOCK_QEMU if args.stock else patched_qemu_path())
    if not is_runnable(binary):
        print(f"testbed qemu run: {binary} is missing (run `make qemu`)")
        return 1
    argv = [str(binary)]
    for fw in FIRMWARE_DIRS:
        argv += ["-L", str(fw)]
    if args.hide:
        argv = hide_prefix(tuple(d.resolve() for d in args.hide)) + argv
    if args.stock:
        return subprocess.run(argv + qemu_args, check=False).returncode

    policy = Policy.from_grants(ro=args.allow_ro, rw=args.allow_rw, create=args.allow_create)
    if args.policy is not None:
        policy = policy.merged(Policy.from_toml(args.policy))
    broker, theirs = serve_socketpair(policy, audit_path=args.audit)
    with broker, theirs:
        fd = theirs.fileno()
        argv += ["-open-hook-fd", str(fd)]
        try:
            status = subprocess.run(argv + qemu_args, pass_fds=(fd,), check=False).returncode
        except OSError as err:
            print(f"testbed qemu run: cannot run {argv[0]}: {err}")
            return 1
        records = broker.records
    granted = sum(1 for r in records if r.result == 0)
    print(
        f"testbed qemu run: QEMU exited with {status}; the broker answered "
        f"{len(records)} requests ({granted} granted, {len(records) - granted} refused)"
        + (f", audit in {args.audit}" if args.audit else "")
    )
    for r in records:
        answer = "ok" if r.result == 0 else os.strerror(-r.result)
        print(f"  {r.path} {'|'.join(r.flag_names)} -> {answer}")
    return status
