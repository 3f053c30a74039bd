"""``python -m testbed.broker``: the broker alone, without the other parts' commands."""

import argparse
import logging
import sys

from testbed.broker.command import register

parser = argparse.ArgumentParser(prog="python -m testbed.broker")
sub = parser.add_subparsers(dest="command", required=True)
register(sub)
args = parser.parse_args(["broker", *sys.argv[1:]])
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
sys.exit(args.func(args))
