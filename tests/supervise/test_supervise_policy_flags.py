"""`testbed supervise` takes every policy flag `testbed broker` does (they share build_policy)."""

from __future__ import annotations

import argparse
from pathlib import Path

from testbed.broker.command import build_policy
from testbed.supervise.command import register


def _parse(words: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["supervise", *words])
    args.peer_uid = args.peer_pid = None  # as run() does: the supervisor has no peer rules
    return args


def test_flags_make_a_policy(tmp_path: Path) -> None:
    plain = build_policy(_parse(["--allow-ro", str(tmp_path), "--", "true"]))
    dirs = build_policy(_parse(["--allow-ro", str(tmp_path), "--allow-directories", "--", "true"]))
    assert plain != dirs  # --allow-directories reaches the policy
