"""``testbed qemu``: find the binaries of every QEMU version, and run QEMU by hand against a broker.

``testbed qemu info`` lists every binary by version and kind (``patched``,
``stock``, ``open-hook-server``) with its ``--version`` and cache key;
``--json`` prints the same as a JSON list and the exit status is 1 when a
requested build is missing.  ``testbed qemu run`` starts an in-process
broker with the given grants, runs the patched QEMU of ``--qemu-version``
with ``-open-hook-fd`` on a socket pair (or the stock one without it), with
QEMU's terminal I/O left alone, so ``-nographic`` or ``-serial mon:stdio``
work, and prints what the broker answered.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from testbed.broker import Policy, serve_socketpair
from testbed.errors import BuildError, QemuVersionError
from testbed.qemu.binaries import (
    BinaryInfo,
    build_hint,
    cache_keys,
    describe,
    is_runnable,
    qemu_binary,
)
from testbed.qemu.commandline import FIRMWARE_DIRS, hide_prefix
from testbed.qemu.versions import DEFAULT_VERSION, Kind, get, parse_versions

EPILOG = """\
examples:
  testbed qemu info
  testbed qemu info --json --qemu-version 10.0
  testbed qemu run --allow-create /srv/vm --hide /srv/vm -- \\
      -nographic -m 256 -drive file=/srv/vm/disk.qcow2,if=virtio
  testbed qemu run --qemu-version 10.0 --stock -- -machine none -monitor stdio
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

    info = qsub.add_parser(
        "info", help="every QEMU binary by version and kind, its --version and cache key"
    )
    info.add_argument(
        "--qemu-version",
        metavar="V[,V...]",
        help="only these versions (default: every registered one); a missing build exits 1",
    )
    info.add_argument("--json", action="store_true", help="print a JSON list instead")
    info.set_defaults(func=run_info)

    run = qsub.add_parser("run", help="run QEMU with -open-hook-fd served by a broker")
    run.add_argument(
        "--qemu-version",
        default=DEFAULT_VERSION,
        metavar="V",
        help=f"the QEMU version to run (default {DEFAULT_VERSION})",
    )
    run.add_argument(
        "--stock",
        action="store_true",
        help="run that version's stock QEMU without the hook (no broker)",
    )
    run.add_argument(
        "--binary", type=Path, help="QEMU binary (default: the patched build of --qemu-version)"
    )
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


def run_info(args: argparse.Namespace) -> int:
    try:
        versions = parse_versions(args.qemu_version)
    except QemuVersionError as err:
        print(f"testbed qemu info: {err}")
        return 2
    infos = [describe(v.name, kind) for v in versions for kind in Kind]
    try:
        keys = cache_keys()
    except BuildError as err:
        keys = {}
        if not args.json:
            print(f"cache keys unknown: {err}")
    if args.json:
        print(json.dumps([i.to_json() for i in infos], indent=2))
    else:
        for info in infos:
            _print_info(info, keys.get((info.version, info.kind), ""))
    return 0 if all(i.present for i in infos) else 1


def _print_info(info: BinaryInfo, key: str) -> None:
    head = f"{info.version:5} {info.kind:17}"
    if not info.present:
        hint = build_hint(get(info.version), Kind(info.kind))
        print(f"{head} {info.path}: missing {', '.join(info.missing)} ({hint})")
        return
    target = info.path.resolve()
    print(f"{head} {info.path}" + (f" -> {target}" if target != info.path else ""))
    if info.version_string:
        print(f"{'':23} {info.version_string}")
    if info.tools:
        print(f"{'':23} tools: {', '.join(info.tools)} in {info.path.parent}")
    built = info.build.get("key")
    if key and built:
        state = "built" if built == key else f"stale (the inputs now give {key}: `make qemu`)"
        print(f"{'':23} cache key {built}: {state}")


def run_qemu(args: argparse.Namespace) -> int:
    qemu_args = list(args.qemu_args)
    if qemu_args[:1] == ["--"]:
        qemu_args = qemu_args[1:]
    try:
        kind = Kind.STOCK if args.stock else Kind.PATCHED
        binary = args.binary or qemu_binary(args.qemu_version, kind)
    except QemuVersionError as err:
        print(f"testbed qemu run: {err}")
        return 2
    if not is_runnable(binary):
        print(f"testbed qemu run: {binary} is missing ({build_hint(get(args.qemu_version), kind)})")
        return 1
    what = "the given binary" if args.binary else f"QEMU {get(args.qemu_version).name} {kind}"
    print(f"testbed qemu run: {what}: {binary}", file=sys.stderr, flush=True)
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
