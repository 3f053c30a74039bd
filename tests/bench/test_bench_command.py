"""``testbed bench`` argument handling."""

from __future__ import annotations

import argparse

import pytest

from testbed.bench.command import parse_clients
from testbed.cli import build_parser


def test_parse_clients() -> None:
    assert parse_clients("1,4,64") == (1, 4, 64)
    for bad in ("", "1,x", "0", "1000"):
        with pytest.raises(argparse.ArgumentTypeError, match="--clients"):
            parse_clients(bad)


def test_bench_is_a_subcommand() -> None:
    args = build_parser().parse_args(["bench", "--quick", "--json", "out.json"])
    assert args.quick and str(args.json) == "out.json" and args.plot is None
