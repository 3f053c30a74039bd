"""The Markdown report: per test and mode, the hooked-only failures, the audit counts."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testbed.iotests.divergences import explain
from testbed.iotests.modes import Mode
from testbed.iotests.results import Status, TestRun, summarise
from testbed.iotests.selection import LeftOut

_MARK = {Status.PASS: "pass", Status.FAIL: "**FAIL**", Status.NOT_RUN: "not run"}

#: How many diff lines of one failure the report shows (the JSON has them all).
DIFF_LINES = 80


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))  # 7.2 before 10.0


def _key(r: TestRun) -> tuple[str, str, str]:
    return (r.version, r.format, r.test)


def divergent(runs: Sequence[TestRun], mode: str) -> list[tuple[TestRun, TestRun]]:
    """(unhooked, other) pairs where the unhooked run passed and ``mode``'s failed."""
    ref = {_key(r): r for r in runs if r.mode == Mode.UNHOOKED.value}
    out = []
    for r in runs:
        if r.mode != mode or r.status is not Status.FAIL:
            continue
        u = ref.get(_key(r))
        if u is not None and u.status is Status.PASS:
            out.append((u, r))
    return out


# what differs between the modes' runs by construction: their directories
_MODE_PATHS = re.compile(r"\b(runs|bin)/(?:unhooked|hooked|supervised)/")
_SOCK_DIR = re.compile(r"tbiot-\w+")
_PIDS = re.compile(r"\d{4,}")  # pids in socket and image names differ from run to run


def same_failure(a: TestRun, b: TestRun) -> bool:
    """Both failed with the same diff against the reference (its file-name header, the
    modes' directories and numbers of four or more digits, such as pids, aside): the
    output is the same, so the failure is the suite's or the machine's, not the hook's."""

    def body(r: TestRun) -> list[str]:
        lines = list(r.diff)
        for head in ("--- ", "+++ "):  # the two file names, wherever check printed them
            i = next((i for i, x in enumerate(lines) if x.startswith(head)), None)
            if i is not None:
                del lines[i]
        return [
            _PIDS.sub("N", _MODE_PATHS.sub(r"\1/MODE/", _SOCK_DIR.sub("tbiot-X", x))) for x in lines
        ]

    return a.status is b.status is Status.FAIL and bool(a.diff) and body(a) == body(b)


def unexplained(runs: Sequence[TestRun], mode: str) -> list[TestRun]:
    """The ``mode``-only failures that no known divergence accounts for."""
    return [r for _u, r in divergent(runs, mode) if explain(r.test, r.diff) is None]


def cost_per_launch(runs: Sequence[TestRun], mode: str) -> float | None:
    """Extra seconds per QEMU launch in ``mode``: over tests that passed both ways,
    (time in ``mode`` - time unhooked) / launches.  What the hook costs a
    short-lived QEMU, broker start-up included."""
    ref = {_key(r): r for r in runs if r.mode == Mode.UNHOOKED.value and r.status is Status.PASS}
    extra, launches = 0.0, 0
    for r in runs:
        u = ref.get(_key(r))
        if r.mode == mode and r.status is Status.PASS and u is not None and r.launches:
            extra += r.seconds - u.seconds
            launches += r.launches
    return extra / launches if launches else None


def _fmt_s(x: float | None, scale: float = 1.0, unit: str = "s") -> str:
    return "-" if x is None else f"{x * scale:.3g} {unit}"


def _counts(runs: Sequence[TestRun]) -> list[str]:
    lines = ["## Counts per version and mode", ""]
    lines.append(
        "| version | mode | pass | fail | not run | time | QEMU launches | broker requests "
        "| not a descriptor | brokers left | launch to first answer (median) "
        "| request (median) | extra per launch |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in summarise(runs):
        same = [r for r in runs if r.version == s.version]
        per_launch = None if s.mode == Mode.UNHOOKED.value else cost_per_launch(same, s.mode)
        lines.append(
            f"| {s.version} | {s.mode} | {s.counts['pass']} | {s.counts['fail']} "
            f"| {s.counts['not run']} | {s.seconds:.0f} s | {s.launches} | {s.requests} "
            f"| {s.refusals} | {s.brokers_left} | {_fmt_s(s.first_answer_median_s)} "
            f"| {_fmt_s(s.latency_median_us, unit='us')} | {_fmt_s(per_launch)} |"
        )
    lines += [
        "",
        "*not a descriptor*: broker answers that were an errno (refusals and real errors "
        "such as ENOENT); *launch to first answer*: from the wrapper's start to the "
        "broker's first audit record, per QEMU; *extra per launch*: (hooked - unhooked "
        "time) / launches over the tests that passed both ways.",
    ]
    return lines


def _failure(r: TestRun) -> list[str]:
    """One test that failed only in a hooked mode: divergences, refusals, its diff."""
    lines = [f"### {r.test} ({r.format}, QEMU {r.version}): {r.reason}", ""]
    known = explain(r.test, r.diff)
    if known:
        lines.append("Every changed line is a known divergence:")
        lines += [f"- {k.reason}" for k in known]
        lines.append("")
    if r.refusals:
        lines.append("Broker answers other than a descriptor:")
        lines.append("")
        for path, n in Counter(
            (f.path, " ".join(f.flags), f.result, f.reason) for f in r.refusals
        ).items():
            lines.append(f"- `{path[0]}` {path[1]} -> {path[2]}: {path[3]} (x{n})")
        lines.append("")
    shown = list(r.diff[:DIFF_LINES])
    if len(r.diff) > DIFF_LINES:
        shown.append(f"... {len(r.diff) - DIFF_LINES} more lines in the JSON")
    return [*lines, "```diff", *shown, "```", ""]


def _mode_failures(runs: Sequence[TestRun], mode: str) -> list[str]:
    pairs = divergent(runs, mode)
    n_bad = len(unexplained(runs, mode))
    lines = [
        "",
        f"## {mode}-only failures ({len(pairs)}; {len(pairs) - n_bad} explained by "
        "known divergences)",
        "",
    ]
    if not pairs:
        lines.append(f"None: every test that passed unhooked passed {mode}.")
    for _u, r in pairs:
        lines += _failure(r)
    return lines


def _per_test(runs: Sequence[TestRun], versions: Sequence[str], modes: Sequence[str]) -> list[str]:
    """The table of every test: one column per (version, mode)."""
    lines = ["", "## Per test", ""]
    header = "| test | format | " + " | ".join(f"{v} {m}" for v in versions for m in modes) + " |"
    lines += [header, "|---|---|" + "---|" * (len(versions) * len(modes))]
    cells: dict[tuple[str, str], dict[tuple[str, str], TestRun]] = {}
    for r in runs:
        cells.setdefault((r.test, r.format), {})[(r.version, r.mode)] = r
    for (test, fmt), row in cells.items():
        marks = [_cell(row, v, m) for v in versions for m in modes]
        lines.append(f"| {test} | {fmt} | " + " | ".join(marks) + " |")
    return lines


def _cell(row: dict[tuple[str, str], TestRun], version: str, mode: str) -> str:
    cell = row.get((version, mode))
    if cell is None:
        return ""
    extra = f" ({cell.requests} req)" if cell.requests else ""
    ref = row.get((version, Mode.UNHOOKED.value))
    if mode != Mode.UNHOOKED.value and ref is not None and same_failure(ref, cell):
        extra += ", same output as unhooked"
    return _MARK[cell.status] + extra


def _flaky(runs: Sequence[TestRun]) -> list[str]:
    flaky = [r for r in runs if r.attempts > 1]
    if not flaky:
        return []
    lines = ["", "## Run more than once", ""]
    lines.append("A failed test runs again (`--retries`); these needed it:")
    lines.append("")
    for r in flaky:
        first = r.earlier_failures[0].splitlines() if r.earlier_failures else [""]
        lines.append(
            f"- {r.version} {r.mode} {r.test} ({r.format}): {r.status.value} on attempt "
            f"{r.attempts}; first: {first[0]}"
        )
        changed = [x for x in first[1:] if x.startswith(("+", "-")) and x[:3] not in ("+++", "---")]
        lines += [f"  `{x}`" for x in changed[:4]]
    return lines


def _not_run(runs: Sequence[TestRun]) -> list[str]:
    not_run = [r for r in runs if r.status is Status.NOT_RUN and r.reason]
    if not not_run:
        return []
    lines = ["", "## Why not run", ""]
    for reason, n in Counter((r.mode, r.reason) for r in not_run).most_common():
        lines.append(f"- {reason[0]}: {reason[1]} ({n})")
    return lines


def _left_out(left_out: Sequence[LeftOut]) -> list[str]:
    if not left_out:
        return []
    return ["", "## Left out of the selection", "", *(f"- {x.name}: {x.reason}" for x in left_out)]


def render(runs: Sequence[TestRun], meta: dict[str, Any], left_out: Sequence[LeftOut]) -> str:
    """The Markdown report of an iotests run, its sections in the order they print."""
    modes = [m.value for m in Mode if any(r.mode == m.value for r in runs)]
    versions = sorted({r.version for r in runs}, key=_version_key)
    lines = ["# QEMU iotests through the open hook", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", *_counts(runs)]
    for mode in modes:
        if mode != Mode.UNHOOKED.value:
            lines += _mode_failures(runs, mode)
    lines += _per_test(runs, versions, modes)
    lines += _flaky(runs)
    lines += _not_run(runs)
    lines += _left_out(left_out)
    return "\n".join(lines) + "\n"


def write_report(
    directory: Path, runs: Sequence[TestRun], meta: dict[str, Any], left_out: Sequence[LeftOut]
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "iotests.md"
    path.write_text(render(runs, meta, left_out))
    return path


__all__ = ["divergent", "render", "write_report"]
