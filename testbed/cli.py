"""``testbed``: the command line.

Each part of the testbed contributes one subcommand from a ``command``
module with a ``register(subparsers)`` function that adds its parser and sets
``func`` to a handler taking the parsed arguments and returning the exit
status.  Parts are imported lazily so that a broken or absent part does not
take the other commands down with it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from testbed import __version__

#: Modules that provide subcommands, in the order ``--help`` lists them.
COMMAND_MODULES = (
    "testbed.broker.command",
    "testbed.block.command",
    "testbed.qemu.command",
    "testbed.compare.command",
    "testbed.bench.command",
    "testbed.guest.command",
    "testbed.libvirt.command",
    "testbed.supervise.command",
)


def _part_unavailable(name: str, err: BaseException) -> None:
    print(f"testbed: warning: {name} is unavailable: {type(err).__name__}: {err}", file=sys.stderr)


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="testbed",
        description=(
            "Testbed for QEMU's -open-hook-fd RFC: a broker that opens image files "
            "for QEMU and passes the descriptors back with SCM_RIGHTS, a model of "
            "QEMU's block-layer open path, a patched QEMU, comparisons, benchmarks "
            "and a guest boot."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (repeat for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and name.startswith(err.name):
                continue  # that part is not in this tree
            _part_unavailable(name, err)
            continue
        except Exception as err:  # a broken part must not take the others down
            _part_unavailable(name, err)
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # A hooked QEMU waits for its broker: import no other part for it.
    only = ("testbed.broker.command",) if list(argv[:1]) == ["broker"] else COMMAND_MODULES
    parser = build_parser(only)
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
