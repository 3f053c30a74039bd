"""``testbed libvirt``: install, define, serve and the demo."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from testbed.errors import TestbedError

log = logging.getLogger(__name__)

DESCRIPTION = """\
Run QEMU under Debian's libvirt, with every image open going through a
broker that runs as root while QEMU runs as libvirt-qemu: the patched QEMU
with the hook, or (--supervise) stock QEMU whose opens a seccomp supervisor
serves, confined by Landlock.

  install   copy the patched QEMU builds, this package and the guest to a
            world-readable prefix (/opt/testbed), with one <emulator>
            wrapper per QEMU version and mode: bin/qemu-VERSION-MODE
  define    write DIR/NAME.xml (the domain) and DIR/NAME.policy.toml (its
            broker's grants) side by side
  serve     as root: listen at /run/testbed/libvirt/NAME.sock, take the
            domain's one connection, and serve it with the policy until
            QEMU exits (run it before `virsh start NAME`); --supervise for
            a domain defined with --supervise
  demo      the whole scenario: daemons, start, snapshot, blockcommit,
            blockcopy, blockpull, a refused snapshot, destroy, record check

The wrapper passes libvirt's capability probes through untouched.  For a
real domain it connects to the domain's socket and execs QEMU with
-open-hook-fd, or (supervise) gets confined by the supervisor and hands it
its seccomp listener, then execs stock QEMU; with no socket it refuses to
start QEMU, and says so in libvirt's error.  See docs/libvirt.md.
"""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "libvirt",
        help="libvirt as the hook's client: wrapper, per-domain broker, demo",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    _register_install_and_define(verbs)
    _register_serve(verbs)
    _register_demo(verbs)


def _register_install_and_define(verbs: Any) -> None:
    inst = verbs.add_parser("install", help="copy QEMU, the wrapper and the guest to --prefix")
    inst.add_argument("--prefix", type=Path, default=Path("/opt/testbed"))
    inst.add_argument(
        "--qemu-version", action="append", metavar="V", help="only this version (repeatable)"
    )
    inst.set_defaults(func=run_install)

    dfn = verbs.add_parser("define", help="write NAME.xml and NAME.policy.toml side by side")
    dfn.add_argument("name")
    dfn.add_argument("--disk", type=Path, required=True, help="the qcow2 image to boot with")
    dfn.add_argument("--dir", type=Path, default=Path("."), help="where to write (default: .)")
    dfn.add_argument("--prefix", type=Path, default=Path("/opt/testbed"))
    dfn.add_argument("--qemu-version", default="7.2", metavar="V")
    dfn.add_argument(
        "--allow-create",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="grant creating files in DIR (default: the disk's directory)",
    )
    dfn.add_argument(
        "--supervise",
        action="store_true",
        help="stock QEMU under the supervisor (wrapper qemu-V-supervise; kernel and initrd "
        "granted read-only)",
    )
    dfn.set_defaults(func=run_define)


def _register_serve(verbs: Any) -> None:
    srv = verbs.add_parser("serve", help="as root: the broker of domain NAME (one connection)")
    srv.add_argument("name")
    srv.add_argument("--policy", type=Path, help="policy TOML (default: ./NAME.policy.toml)")
    srv.add_argument("--audit", type=Path, help="append one JSON line per request")
    srv.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for QEMU")
    srv.add_argument("--qemu-user", default="libvirt-qemu", help="the uid QEMU runs as")
    srv.add_argument(
        "--supervise",
        action="store_true",
        help="confine the wrapper (seccomp + Landlock) and serve stock QEMU's opens",
    )
    srv.add_argument(
        "--system-profile",
        default="qemu",
        metavar="NAME|FILE",
        help="with --supervise: the system profile, to which /dev/ptmx is added (default qemu)",
    )
    srv.set_defaults(func=run_serve)


def _register_demo(verbs: Any) -> None:
    demo = verbs.add_parser(
        "demo", help="libvirt block jobs on a hooked (or supervised) QEMU, then check"
    )
    demo.add_argument("--qemu-version", default="7.2", metavar="V")
    demo.add_argument(
        "--supervise",
        action="store_true",
        help="stock QEMU with its opens served by the seccomp supervisor, under Landlock",
    )
    demo.add_argument("--json", type=Path, metavar="FILE", help="write the result as JSON")
    demo.add_argument(
        "--workdir", type=Path, default=Path("/var/lib/testbed/libvirt/demo"), metavar="DIR"
    )
    demo.add_argument("--prefix", type=Path, default=Path("/opt/testbed"))
    demo.add_argument("--keep", action="store_true", help="keep the images after a good run")
    demo.set_defaults(func=run_demo_command)


def run_install(args: argparse.Namespace) -> int:
    from testbed.libvirt.install import install

    try:
        where = install(prefix=args.prefix, versions=args.qemu_version)
    except TestbedError as err:
        print(f"testbed libvirt install: {err}", file=sys.stderr)
        return 1
    for wrapper in sorted((where.prefix / "bin").iterdir()):
        print(wrapper)
    return 0


def run_define(args: argparse.Namespace) -> int:
    from testbed.libvirt.domain import DomainConfig, define
    from testbed.libvirt.emulator import Mode
    from testbed.libvirt.install import Installed
    from testbed.libvirt.serve import QEMU_USER, qemu_ids

    where = Installed(prefix=args.prefix)
    mode = Mode.SUPERVISE if args.supervise else Mode.HOOK
    try:
        disk = args.disk.resolve()
        uid, _ = qemu_ids(QEMU_USER)
        cfg = DomainConfig(
            name=args.name,
            emulator=where.wrapper(args.qemu_version, mode),
            kernel=where.kernel,
            initrd=where.initrd,
            disk=disk,
            create_dirs=tuple(p.resolve() for p in args.allow_create) or (disk.parent,),
            # supervised, QEMU's own reads of -kernel/-initrd are opens the supervisor serves
            ro_paths=(where.kernel, where.initrd) if args.supervise else (),
            peer_uid=uid,
        )
        files = define(cfg, args.dir)
    except (TestbedError, OSError) as err:
        print(f"testbed libvirt define: {err}", file=sys.stderr)
        return 1
    print(f"{files.xml}\n{files.policy}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from testbed.libvirt.domain import files_for
    from testbed.libvirt.serve import ServeConfig, serve

    try:
        policy = args.policy or files_for(Path("."), args.name).policy
        if not policy.is_file():
            raise TestbedError(f"no policy file {policy} (write one with `testbed libvirt define`)")
        return serve(
            ServeConfig(
                name=args.name,
                policy=policy.resolve(),
                audit=args.audit.resolve() if args.audit else None,
                qemu_user=args.qemu_user,
                timeout=args.timeout,
                supervise=args.supervise,
                profile=args.system_profile,
            )
        )
    except (TestbedError, OSError) as err:
        print(f"testbed libvirt serve: {err}", file=sys.stderr)
        return 1


def run_demo_command(args: argparse.Namespace) -> int:
    from testbed.libvirt.demo import DemoOptions, DemoStep, run_demo

    t0 = [0.0]

    def show(step: DemoStep) -> None:
        t0[0] += step.seconds
        mark = "ok  " if step.ok else "FAIL"
        what = step.detail if step.ok else step.error
        print(
            f"[{t0[0]:7.2f}s] {mark} {step.name:<48} {step.seconds:5.2f}s "
            f"(virsh {step.virsh_seconds:5.2f}s) {step.broker_requests:2d} requests "
            f"({step.image_requests:2d} images)  {what}",
            flush=True,
        )

    opts = DemoOptions(
        qemu_version=args.qemu_version,
        supervise=args.supervise,
        workdir=args.workdir,
        prefix=args.prefix,
        keep=args.keep,
    )
    result = run_demo(opts, on_step=show)
    if args.json:
        result.write_json(args.json)
    print(
        f"records: {result.records_written} synced, {result.records_verified} verified, "
        f"{result.lost} lost; broker requests: {result.broker_requests} "
        f"({result.image_requests} for images); "
        f"QEMU ran as {result.qemu_user}"
    )
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
    print(f"libvirt demo (QEMU {result.qemu_version}, {result.mode}): "
          + ("OK" if result.ok else "FAILED"))  # fmt: skip
    return 0 if result.ok else 1
