"""``testbed bench`` argument handling."""

from __future__ import annotations

import argparse

import pytest

from testbed.bench import qemus
from testbed.bench.command import parse_clients, plan_from
from testbed.cli import build_parser


def test_parse_clients() -> None:
    assert parse_clients("1,4,64") == (1, 4, 64)
    for bad in ("", "1,x", "0", "1000"):
        with pytest.raises(argparse.ArgumentTypeError, match="--clients"):
            parse_clients(bad)


def test_bench_is_a_subcommand() -> None:
    args = build_parser().parse_args(["bench", "--quick", "--json", "out.json"])
    assert args.quick and str(args.json) == "out.json" and args.plot is None


def plan(*argv: str):  # type: ignore[no-untyped-def]
    return plan_from(build_parser().parse_args(["bench", *argv]))


def test_full_and_quick_plans() -> None:
    full, quick = plan(), plan("--quick")
    assert full.reps >= 7 and quick.reps < full.reps
    assert quick.depths == full.depths == (1, 4, 16, 64)
    assert 16 in quick.storm_sizes and 64 in quick.clients  # every ratio, also quick


def test_options_narrow_the_plan() -> None:
    p = plan("--reps", "9", "--only", "startup,storm", "--transports", "path,hook")
    assert (p.reps, p.experiments, p.transports) == (9, ("startup", "storm"), ("path", "hook"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--only", "pingpong,nfs"), "--only: unknown nfs"),
        (("--transports", "carrier-pigeon"), "--transports: unknown carrier-pigeon"),
        (("--qemu-version", "1.0"), r"--qemu-version: unknown 1\.0 \(known: 7\.2, 10\.0\)"),
        (("--qemu-version", ","), "--qemu-version .*empty list"),
        (("--reps", "0"), "--reps 0"),
    ],
)
def test_bad_options_are_named(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        plan(*argv)


def test_qemu_versions_are_listed_first_one_primary() -> None:
    p = plan("--qemu-version", "10.0,7.2,10.0")
    assert p.qemu_versions == ("10.0", "7.2") and p.qemu_version == "10.0"


@pytest.mark.parametrize(
    ("built", "expected"),
    [(("7.2", "10.0"), ("7.2", "10.0")), (("10.0",), ("10.0",)), ((), ("7.2",))],
)
def test_by_default_every_built_version_the_default_first(
    monkeypatch: pytest.MonkeyPatch, built: tuple[str, ...], expected: tuple[str, ...]
) -> None:
    monkeypatch.setattr(qemus, "built_versions", lambda: built)
    assert plan().qemu_versions == expected


def test_a_ratio_key_carries_the_version_but_on_the_primary_one() -> None:
    assert qemus.versioned("qemu_hook_vs_path", "7.2", "7.2") == "qemu_hook_vs_path"
    assert qemus.versioned("qemu_hook_vs_path", "10.0", "7.2") == "qemu_hook_vs_path@10.0"
