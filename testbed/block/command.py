"""``testbed model open``: run the block-layer model on an image through an in-process broker.

The model asks a :class:`testbed.broker.Broker` (served in a thread, over a
socketpair) for every open, exactly as a hooked QEMU would; the command
prints the requests the broker answered and the sha256 of the whole
guest-visible disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from testbed.block.layer import BlockLayer
from testbed.errors import BlockError, TestbedError
from testbed.qemu.commandline import Attach, AttachKind

if TYPE_CHECKING:
    from testbed.broker import AuditRecord, Policy

#: How much the disk hash reads at a time.
CHUNK = 4 << 20
DRIVE = "drive0"


@dataclass(frozen=True, kw_only=True)
class OpenResult:
    trace: list[dict[str, Any]]
    sha256: str
    virtual_size: int
    format: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def register(subparsers: Any) -> None:
    model = subparsers.add_parser(
        "model", help="the Python model of QEMU 7.2's block layer, opening through a broker"
    )
    sub = model.add_subparsers(dest="model_command", metavar="ACTION")
    p = sub.add_parser(
        "open",
        help="open an image as QEMU would, print the broker's trace and the disk's sha256",
        description=(
            "Open IMAGE with the block-layer model through an in-process broker that "
            "grants the image's directory read-write and create (or --policy), print every "
            "open request the broker answered and the sha256 of the guest-visible disk."
        ),
    )
    p.add_argument("image", help="image file (or a fat:DIR name)")
    p.add_argument("--format", help="image format (default: probe, as QEMU does)")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--drive",
        dest="how",
        action="store_const",
        const="drive",
        help="attach as -drive with a device (auto-read-only; the default)",
    )
    how.add_argument(
        "--blockdev",
        dest="how",
        action="store_const",
        const="blockdev",
        help="attach as -blockdev (read-write at once, no protocol probe)",
    )
    p.add_argument("--read-only", action="store_true", help="read-only=on")
    p.add_argument("--cache-direct", action="store_true", help="cache.direct=on (O_DIRECT)")
    p.add_argument(
        "--snapshot",
        metavar="NEWFILE",
        help="then blockdev-snapshot-sync to NEWFILE (qcow2, absolute-paths)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--policy", metavar="FILE", help="broker policy (TOML) instead of the default")
    p.set_defaults(func=run_open, how="drive")
    model.set_defaults(func=lambda args: _usage(model))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run_open(args: argparse.Namespace) -> int:
    try:
        result = open_image(
            args.image,
            fmt=args.format,
            how=args.how,
            read_only=args.read_only,
            cache_direct=args.cache_direct,
            snapshot=args.snapshot,
            policy_file=args.policy,
            progress=not args.json and sys.stderr.isatty(),
        )
    except OSError as err:
        name = err.filename if err.filename is not None else args.image
        print(f"testbed model open: {name}: {err.strerror or err}", file=sys.stderr)
        return 1
    except TestbedError as err:
        print(f"testbed model open: {args.image}: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    for ev in result.trace:
        code = -ev["result"]
        res = "fd" if code <= 0 else (f"-{errno.errorcode.get(code, code)} ({os.strerror(code)})")
        mode = f" {ev['mode']:04o}" if ev["flags"] & os.O_CREAT else ""
        names = "|".join(ev["flag_names"])
        print(f"{ev['path']}  {names}{mode}  -> {res}")
    print(f"format {result.format}, virtual size {result.virtual_size} bytes")
    print(f"sha256 {result.sha256}")
    return 0


def open_image(
    image: str,
    *,
    fmt: str | None = None,
    how: str = "drive",
    read_only: bool = False,
    cache_direct: bool = False,
    snapshot: str | None = None,
    policy_file: str | None = None,
    progress: bool = False,
) -> OpenResult:
    """Open ``image`` with the model through a fresh in-process broker; hash the disk.

    The broker, the layer and the hash share one ``with`` block, whose end
    is when the trace is complete.
    """
    from testbed.broker import serve_socketpair
    from testbed.transport import HookClient

    if how == "blockdev" and fmt is None:
        raise BlockError("-blockdev names its driver: give --format")
    attach = Attach(
        filename=image,
        fmt=fmt,
        node=DRIVE,
        kind=AttachKind(how),
        read_only=read_only,
        cache_direct=cache_direct,
        # -drive comes with a device (it takes write permission)
        device="virtio-blk-pci" if how == "drive" else None,
    )
    broker, theirs = serve_socketpair(_policy(image, snapshot, policy_file))
    with broker, HookClient(theirs) as client:
        layer = BlockLayer(client)
        try:
            layer.attach(attach)
            if snapshot:
                layer.blockdev_snapshot_sync(DRIVE, snapshot, "qcow2", "absolute-paths")
            top = layer.top(DRIVE)
            digest = _hash_disk(layer, top.virtual_size, progress)
            size, driver = top.virtual_size, layer.top(DRIVE).driver
            if snapshot:
                driver = layer.top(DRIVE).chain()[1].driver
        finally:
            layer.quit()
    # Every answer is recorded before it is sent (an unaudited open is not
    # allowed), so once the layer has quit the records are the whole trace.
    return OpenResult(trace=_trace(broker.records), sha256=digest, virtual_size=size, format=driver)


def _policy(image: str, snapshot: str | None, policy_file: str | None) -> Policy:
    """``--policy``'s, or read-write and create in the image's (and snapshot's) directory."""
    from testbed.broker import Policy

    if policy_file:
        return Policy.from_toml(policy_file)
    if image.startswith("fat:"):
        directory = image.rsplit(":", 1)[-1]
    else:
        directory = os.path.dirname(os.path.abspath(image))
    grant = [directory]
    if snapshot:
        grant.append(os.path.dirname(os.path.abspath(snapshot)))
    return Policy.from_grants(rw=grant, create=grant)


def _trace(records: list[AuditRecord]) -> list[dict[str, Any]]:
    """The broker's records as ``--json`` prints them."""
    return [
        {
            "path": r.path,
            "flags": r.flags,
            "flag_names": list(r.flag_names),
            "mode": r.mode,
            "result": r.result,
        }
        for r in records
    ]


def _hash_disk(layer: BlockLayer, size: int, progress: bool) -> str:
    digest = hashlib.sha256()
    for offset in range(0, size, CHUNK):
        digest.update(layer.read(DRIVE, offset, min(CHUNK, size - offset)))
        if progress and size > 16 * CHUNK:
            print(f"\rhashing {100 * (offset + CHUNK) // size:3d}%", end="", file=sys.stderr)
    if progress and size > 16 * CHUNK:
        print(file=sys.stderr)
    return digest.hexdigest()
