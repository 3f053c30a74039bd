"""The comparison's outputs: a terminal table, a JSON file, a Markdown and an HTML report.

Every column, title and detail that concerns an oracle or a pair comes from
the registry (:mod:`testbed.compare.oracles`): the pairs with a ``column``,
the oracles judged by outcome (fd sets: ``works`` / ``fails``), the one
whose trace the rows count (``trace_heading``), the per-operation columns an
oracle adds.  No oracle is named here.
"""

from __future__ import annotations

import difflib
import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from testbed.compare.compare import KNOWN_DIVERGENCES, PairResult, Status
from testbed.compare.oracles import (
    HOOK_LEGEND,
    PAIRS,
    OperationColumn,
    Oracle,
    by_outcome,
    counted_per_operation,
    listed,
    operation_columns,
    reference,
    shown_pairs,
)
from testbed.compare.oracles import short_error as short_error  # re-exported
from testbed.compare.run import ScenarioResult
from testbed.compare.trace import lines
from testbed.compare.versions import by_version, compared, differences, rows, versions_of
from testbed.qemu import Kind

_STYLE = {
    Status.MATCH: "green",
    Status.KNOWN: "yellow",
    Status.MISMATCH: "bold red",
    Status.SKIPPED: "dim",
}
_WORD = {
    Status.MATCH: "=",
    Status.KNOWN: "known",
    Status.MISMATCH: "MISMATCH",
    Status.SKIPPED: "skipped",
}


def _cell(status: Status) -> str:
    return f"[{_STYLE[status]}]{_WORD[status]}[/]"


def _outcome_cell(r: ScenarioResult, oracle: Oracle) -> str:
    fd = r.oracles.get(oracle.name)
    if fd is None or fd.skipped:
        return "[dim]skipped[/]"
    return "[green]works[/]" if fd.ok else "[yellow]fails[/]"


def _opens_count(r: ScenarioResult) -> str:
    """How many opens the reference oracle (patched QEMU) made, ``-`` if it did not run."""
    p = r.oracles.get(reference().name)
    return str(len(p.trace)) if p else "-"


def _scenario_columns() -> int:
    """Cells per version in a scenario row: opens, the shown pairs, the outcomes, status."""
    return 2 + len(shown_pairs()) + len(by_outcome())


def _title() -> str:
    return " vs ".join(o.title for o in listed())


def _per_operation_title() -> str:
    return " vs ".join(["the hook", *(o.title for o in by_outcome())])


def terminal_table(results: list[ScenarioResult]) -> Table:
    """One row per scenario, one column group per QEMU version."""
    versions = versions_of(results)
    table = Table(title=f"open-hook-fd: {_title()}")
    table.add_column("scenario")
    heads = ["opens", *(p.column for p in shown_pairs()), *(o.title for o in by_outcome())]
    for v in versions:
        for col in (*heads, "status"):
            table.add_column(f"{v} {col}", justify="right" if col == "opens" else "left")
    table.add_column("time", justify="right")
    for name, per in rows(results):
        cells = [name]
        for v in versions:
            r = per.get(v)
            if r is None:
                cells += ["-"] * _scenario_columns()
                continue
            cells += [
                _opens_count(r),
                *(_cell(r.pair(p.left, p.right).status) for p in shown_pairs()),
                *(_outcome_cell(r, o) for o in by_outcome()),
                _cell(r.status),
            ]
        cells.append(f"{sum(r.seconds for r in per.values()):.1f}s")
        table.add_row(*cells)
    return table


def _works_fails(results: list[ScenarioResult], oracle: Oracle) -> dict[str, int]:
    """``<name>_works`` and ``<name>_fails``: where it worked, and where it ran and failed."""
    got = [r.oracles[oracle.name] for r in results if oracle.name in r.oracles]
    return {
        f"{oracle.name}_works": sum(1 for f in got if f.ok),
        f"{oracle.name}_fails": sum(1 for f in got if not f.ok and not f.skipped),
    }


def summary(results: list[ScenarioResult]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "scenarios": len(results),
        "status": dict(Counter(r.status for r in results)),
    }
    for p in shown_pairs():
        out[p.key] = dict(Counter(r.pair(p.left, p.right).status for r in results))
    for o in by_outcome():
        out |= _works_fails(results, o)
    #: summed over scenarios (more than the wall time with --jobs > 1)
    out["scenario_seconds"] = round(sum(r.seconds for r in results), 1)
    return out


def _hook_works(r: ScenarioResult) -> bool:
    """Every pair that counts for the hook has one of the statuses it accepts."""
    return all(r.pair(p.left, p.right).status in p.hook for p in PAIRS if p.hook)


def _operation_row(op: str, group: list[ScenarioResult]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "operation": op,
        "scenarios": len(group),
        "status": dict(Counter(r.status for r in group)),
        "hook": f"{sum(1 for r in group if _hook_works(r))}/{len(group)}",
    }
    for o in by_outcome():
        row |= _works_fails(group, o)
    for o in counted_per_operation():
        ran = [r.oracles[o.name] for r in group if o.name in r.oracles]
        row[o.name] = f"{sum(1 for x in ran if x.ok)}/{len(ran)} work" if ran else "not run"
    for o, column in operation_columns():
        row[column.key] = column.compute([r.oracles[o.name] for r in group if o.name in r.oracles])
    return row


def operation_summary(results: list[ScenarioResult]) -> list[dict[str, Any]]:
    """One row per operation: the hook, each outcome oracle's works / fails, the
    ``works_per_operation`` oracles, and the registered per-operation columns."""
    groups: dict[str, list[ScenarioResult]] = {}
    for r in results:
        groups.setdefault(r.scenario.operation, []).append(r)
    return [_operation_row(op, group) for op, group in groups.items()]


def _work_fail(row: dict[str, Any], oracle: Oracle) -> str:
    return f"{row[oracle.name + '_works']} work, {row[oracle.name + '_fails']} fail"


def operation_table(results: list[ScenarioResult]) -> Table:
    table = Table(title=f"per operation: {_per_operation_title()}")
    shown = [(o, c) for o, c in operation_columns() if c.terminal]
    cols = (
        "operation",
        "scen.",
        "hook",
        *(o.title for o in by_outcome()),
        *(o.title for o in counted_per_operation()),
        *(c.terminal for _, c in shown),
    )
    for col in cols:
        table.add_column(col)
    for row in operation_summary(results):
        table.add_row(
            row["operation"],
            str(row["scenarios"]),
            row["hook"],
            *(_work_fail(row, o) for o in by_outcome()),
            *(row[o.name] for o in counted_per_operation()),
            *(_terminal_text(c, row[c.key]) for _, c in shown),
        )
    return table


def _terminal_text(column: OperationColumn, value: list[str] | str) -> str:
    text = "; ".join(value) if isinstance(value, list) else value
    return (text[: column.width] if column.width else text) or "-"


def _status_counts(s: dict[str, Any]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(s["status"].items()))


def summary_line(version: str, results: list[ScenarioResult]) -> str:
    s = summary(results)
    return (
        f"QEMU {version}: {s['scenarios']} scenarios: "
        + _status_counts(s)
        + "".join(
            f"; {o.title} work in {s[o.name + '_works']}, fail in {s[o.name + '_fails']}"
            for o in by_outcome()
        )
    )


def differences_line(results: list[ScenarioResult]) -> str:
    versions = versions_of(results)
    if len(versions) < 2:
        return ""
    diffs = differences(results)
    opens = sum(1 for d in diffs if d.opens)
    outcomes = "".join(
        f"{o.result_word} results in {sum(1 for d in diffs if o.name in d.outcomes)}, "
        for o in by_outcome()
    )
    return (
        f"between versions ({' vs '.join(versions)}, {compared(results)} scenarios compared): "
        f"opens differ in {opens}, {outcomes}"
        f"status in {sum(1 for d in diffs if d.status)}"
    )


def print_summary(console: Console, results: list[ScenarioResult], wall: float) -> None:
    console.print(terminal_table(results))
    for v, group in by_version(results).items():
        table = operation_table(group)
        table.title = f"QEMU {v}, per operation: {_per_operation_title()}"
        console.print(table)
    for d in differences(results):
        what = [f"{o} opens differ" for o in d.opens]
        for o in by_outcome():
            if o.name in d.outcomes:
                a, b = d.outcomes[o.name]
                what.append(f"{o.title}: {a[:80]} -> {b[:80]}")
        if d.status:
            what.append(f"status {d.status[0]} -> {d.status[1]}")
        console.print(f"{d.scenario} ({d.base} -> {d.version}): {'; '.join(what)}", markup=False)
    console.print(f"{len(results)} scenario runs in {wall:.1f}s")
    for v, group in by_version(results).items():
        console.print(summary_line(v, group), highlight=False)
    if line := differences_line(results):
        console.print(line, highlight=False)


def write_json(path: Path, results: list[ScenarioResult], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": meta,
        "summary": summary(results),
        "versions": {v: summary(group) for v, group in by_version(results).items()},
        "version_differences": {
            "versions": versions_of(results),
            "scenarios_compared": compared(results),
            "differences": [d.to_json() for d in differences(results)],
        },
        "known_divergences": [
            {"key": k.key, "pair": list(k.pair), "tag": k.tag, "reason": k.reason}
            for k in KNOWN_DIVERGENCES
        ],
        "operations": {v: operation_summary(g) for v, g in by_version(results).items()},
        "scenarios": [r.to_json() for r in results],
    }
    path.write_text(json.dumps(data, indent=1) + "\n")


def _ops(r: ScenarioResult, oracle: str) -> str:
    res = r.oracles.get(oracle)
    if res is None:
        return "not run"
    if res.skipped:
        return f"skipped: {res.skipped}"
    return "; ".join(
        f"{op} {'ok' if out == 'ok' else 'FAILED: ' + out}" for op, out in res.operations
    )


def _anchor(r: ScenarioResult) -> str:
    return f"{r.scenario.name}-{r.qemu_version}".lower().replace(".", "-")


def _binaries(meta: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """version -> (patched, stock) binary, from the run's meta."""
    return {
        v: (b.get(Kind.PATCHED, ""), b.get(Kind.STOCK, ""))
        for v, b in meta.get("binaries", {}).items()
    }


def _pair_text(x: PairResult) -> str:
    """``known-divergence (refusal)``: a pair's status and the divergences that explain it."""
    return x.status + (f" ({', '.join(x.divergences)})" if x.divergences else "")


def _scenario_head() -> list[str]:
    """The headings of one version's cells in a scenario row (Markdown and HTML)."""
    return [
        "opens",
        *(p.heading for p in shown_pairs()),
        *(o.title for o in by_outcome()),
        "status",
    ]


def _operation_head() -> list[str]:
    """The per-operation table's headings (Markdown and HTML)."""
    return [
        "operation",
        "scenarios",
        "hook",
        *(o.title for o in by_outcome()),
        *(o.title for o in counted_per_operation()),
        *(c.heading for _, c in operation_columns()),
    ]


def _status_intro(results: list[ScenarioResult], meta: dict[str, Any]) -> str:
    """``Run <when>; N scenario runs on QEMU <versions> in S s.`` (escape it for HTML)."""
    versions = ", ".join(by_version(results))
    return (
        f"Run {meta.get('started', '')}; {len(results)} scenario runs on QEMU "
        f"{versions} in {meta.get('wall_seconds', '?')} s."
    )


# -- Markdown ----------------------------------------------------------------------------


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _outcome_md(r: ScenarioResult, oracle: Oracle) -> str:
    fd = r.oracles.get(oracle.name)
    if fd is None or fd.skipped:
        return "skipped"
    return "works" if fd.ok else "fails: " + _md(fd.first_error)[:160]


def _versions_head() -> list[str]:
    """The columns of the per-version table (Markdown and HTML alike)."""
    return ["QEMU", Kind.PATCHED, Kind.STOCK, "scenarios", "status",
            *(o.title for o in by_outcome())]  # fmt: skip


def _outcome_counts(s: dict[str, Any]) -> list[str]:
    """One cell per outcome-judged oracle: how many scenarios work and fail."""
    return [f"work in {s[o.name + '_works']}, fail in {s[o.name + '_fails']}" for o in by_outcome()]


def _versions_md(results: list[ScenarioResult], meta: dict[str, Any]) -> list[str]:
    """The title, the run and one row per QEMU version."""
    head = _versions_head()
    out = [
        "# open-hook-fd comparison report",
        "",
        _status_intro(results, meta),
        "",
        _md_row(head),
        "|" + "---|" * len(head),
    ]
    paths = _binaries(meta)
    for v, group in by_version(results).items():
        s = summary(group)
        pa, st = paths.get(v, ("", ""))
        out.append(
            f"| {v} | `{pa}` | `{st}` | {s['scenarios']} | "
            + _status_counts(s)
            + "".join(f" | {cell}" for cell in _outcome_counts(s))
            + " |"
        )
    return out


def _difference_counts(results: list[ScenarioResult]) -> str:
    """``what is opened differs in N, the fd-set result in N, the status in N``."""
    diffs = differences(results)
    outcomes = "".join(
        f"the {o.result_word} result in {sum(1 for d in diffs if o.name in d.outcomes)}, "
        for o in by_outcome()
    )
    return (
        f"what is opened differs in {sum(1 for d in diffs if d.opens)}, {outcomes}"
        f"the status in {sum(1 for d in diffs if d.status)}"
    )


def _differences_md(results: list[ScenarioResult]) -> list[str]:
    versions = versions_of(results)
    if len(versions) < 2:
        return []
    out = [
        "## Between versions",
        "",
        f"{compared(results)} scenarios ran on {', '.join(versions)}; against {versions[0]}, "
        f"{_difference_counts(results)}.",
        "",
    ]
    for d in differences(results):
        out.append(f"### {d.scenario}: {d.base} → {d.version}")
        out.append("")
        if d.status:
            out += [f"status: {d.status[0]} → {d.status[1]}", ""]
        for o in by_outcome():
            if o.name in d.outcomes:
                a, b = d.outcomes[o.name]
                out += [f"{o.title}: {_md(a)} → {_md(b)}", ""]
        for oracle, diff in d.opens.items():
            out += [f"{oracle} opens:", "", "```diff", *diff, "```", ""]
    return out


def _operation_md(row: dict[str, Any]) -> str:
    cells = [
        str(row["operation"]),
        str(row["scenarios"]),
        row["hook"],
        *(_work_fail(row, o) for o in by_outcome()),
        *(row[o.name] for o in counted_per_operation()),
    ]
    for _, c in operation_columns():
        text = c.text(row[c.key])
        cells.append(_md(text) if c.escape else text)
    return _md_row(cells)


def _operations_md(results: list[ScenarioResult]) -> list[str]:
    """One per-operation table per QEMU version."""
    out = []
    legend = "; ".join([HOOK_LEGEND, *(o.legend for o in by_outcome() if o.legend)])
    head = _operation_head()
    for v, group in by_version(results).items():
        out += [
            f"## Per operation, QEMU {v}",
            "",
            legend + ".",
            "",
            _md_row(head),
            "|" + "---|" * len(head),
            *(_operation_md(row) for row in operation_summary(group)),
            "",
        ]
    return out


def _scenarios_md(results: list[ScenarioResult]) -> list[str]:
    """One row per scenario, one group of cells per QEMU version."""
    versions = versions_of(results)
    head = ["scenario", *(f"{v} {h}" for v in versions for h in _scenario_head())]
    out = ["## Scenarios", "", _md_row(head), "|" + "---|" * len(head)]
    for name, per in rows(results):
        cells = [name]
        for v in versions:
            r = per.get(v)
            if r is None:
                cells += ["-"] * _scenario_columns()
                continue
            cells += [
                f"[{_opens_count(r)}](#{_anchor(r)})",
                *(_pair_text(r.pair(p.left, p.right)) for p in shown_pairs()),
                *(_outcome_md(r, o) for o in by_outcome()),
                r.status,
            ]
        out.append(_md_row(cells))
    return out


def _divergences_md() -> list[str]:
    out = ["## Known divergences", "", "| key | pair | applies to | reason |", "|---|---|---|---|"]
    for k in KNOWN_DIVERGENCES:
        out.append(
            f"| {k.key} | {' vs '.join(k.pair)} | {k.tag or 'every scenario'} | {k.reason} |"
        )
    return out


def _details_md(r: ScenarioResult) -> list[str]:
    """One scenario run: what it is, each listed oracle's operations, the trace, the diffs."""
    sc = r.scenario
    image = r.image.format if r.image else "recipe"
    sub = ", " + r.image.subformat if r.image and r.image.subformat else ""
    out = [
        f'<a id="{_anchor(r)}"></a>',
        "",
        f"### {sc.name} on QEMU {r.qemu_version}",
        "",
        f"image `{sc.image or sc.main}` ({image}{sub}), attach `{sc.attach}`, grant "
        f"`{sc.grant}`, steps `{'; '.join(sc.operations)}` ({sc.source}) — **{r.status}**",
        "",
        *(f"- {o.name}: {_ops(r, o.name)}" for o in listed()),
        "",
    ]
    ref = reference()
    p = r.oracles.get(ref.name)
    if p is not None and p.trace:
        out += [ref.trace_heading, "", "```", *lines(p.trace), "```", ""]
    for pair in r.pairs:
        if pair.diff:
            out += [
                f"{pair.left} vs {pair.right}: {_pair_text(pair)}",
                "",
                "```diff",
                *pair.diff,
                "```",
                "",
            ]
        elif pair.status == Status.SKIPPED:
            out += [f"{pair.left} vs {pair.right}: skipped ({pair.why_skipped})", ""]
    return out


def write_markdown(path: Path, results: list[ScenarioResult], meta: dict[str, Any]) -> None:
    """The Markdown report, section by section."""
    out = [
        *_versions_md(results, meta),
        "",
        *_differences_md(results),
        *_operations_md(results),
        *_scenarios_md(results),
        "",
        *_divergences_md(),
        "",
        "## Details",
        "",
    ]
    for r in results:
        out += _details_md(r)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")


# -- HTML --------------------------------------------------------------------------------

_CSS = """
body { font-family: sans-serif; margin: 2em; }
table { border-collapse: collapse; margin-bottom: 1em; }
td, th { border: 1px solid #ccc; padding: 2px 6px; font-size: 90%; }
.match { background: #dfd; } .known-divergence { background: #ffd; }
.mismatch { background: #fcc; font-weight: bold; } .skipped { color: #888; }
.fd-works { background: #dfd; } .fd-fails { background: #eee; cursor: help; }
td:first-child, td.match, td.known-divergence, td.mismatch { white-space: nowrap; }
pre { background: #f6f6f6; padding: .5em; }
table.diff { font-family: monospace; } .diff_add { background: #aaffaa; }
.diff_chg { background: #ffff77; } .diff_sub { background: #ffaaaa; }
"""

_e = html.escape


def _th(cells: list[str]) -> str:
    return "".join(f"<th>{c}" for c in cells)


def _outcome_html(r: ScenarioResult, oracle: Oracle) -> str:
    fd = r.oracles.get(oracle.name)
    if fd is None or fd.skipped:
        return "<td class='skipped'>skipped"
    if fd.ok:
        return "<td class='fd-works'>works"
    # The full error (with QEMU's whole option string) is in the tooltip.
    error = fd.first_error
    return f"<td class='fd-fails' title='{_e(error)}'>fails: {_e(short_error(error))}"


def _versions_html(results: list[ScenarioResult], meta: dict[str, Any]) -> list[str]:
    head = _versions_head()
    parts = [
        f"<!doctype html><meta charset=utf-8><title>open-hook-fd comparison</title>"
        f"<style>{_CSS}</style><h1>open-hook-fd comparison report</h1>",
        f"<p>{_e(_status_intro(results, meta))}</p>",
        f"<table><tr>{_th(head)}</tr>",
    ]
    paths = _binaries(meta)
    for v, group in by_version(results).items():
        s = summary(group)
        pa, st = paths.get(v, ("", ""))
        parts.append(
            f"<tr><td>{_e(v)}<td>{_e(pa)}<td>{_e(st)}<td>{s['scenarios']}<td>"
            + _e(_status_counts(s))
            + "".join(f"<td>{cell}" for cell in _outcome_counts(s))
            + "</tr>"
        )
    parts.append("</table>")
    return parts


def _differences_html(results: list[ScenarioResult]) -> list[str]:
    versions = versions_of(results)
    if len(versions) < 2:
        return []
    parts = [
        "<h2>Between versions</h2>",
        f"<p>{compared(results)} scenarios ran on {_e(', '.join(versions))}; against "
        f"{_e(versions[0])}, {_difference_counts(results)}.</p>",
    ]
    for d in differences(results):
        parts.append(f"<h3>{_e(d.scenario)}: {_e(d.base)} → {_e(d.version)}</h3><ul>")
        if d.status:
            parts.append(f"<li>status: {_e(d.status[0])} → {_e(d.status[1])}</li>")
        for o in by_outcome():
            if o.name in d.outcomes:
                a, b = d.outcomes[o.name]
                parts.append(f"<li>{_e(o.title)}: {_e(a)} → {_e(b)}</li>")
        parts.append("</ul>")
        for oracle, diff in d.opens.items():
            parts.append(f"<p>{_e(oracle)} opens:</p><pre>" + _e("\n".join(diff)) + "</pre>")
    return parts


def _operation_html(row: dict[str, Any]) -> str:
    return (
        f"<tr><td>{_e(row['operation'])}<td>{row['scenarios']}<td>{_e(row['hook'])}"
        + "".join(f"<td>{_work_fail(row, o)}" for o in by_outcome())
        + "".join(f"<td>{_e(row[o.name])}" for o in counted_per_operation())
        + "".join(f"<td>{_e(c.text(row[c.key]))}" for _, c in operation_columns())
        + "</tr>"
    )


def _operations_html(results: list[ScenarioResult]) -> list[str]:
    parts = []
    for v, group in by_version(results).items():
        parts += [
            f"<h2>Per operation, QEMU {_e(v)}</h2><table><tr>{_th(_operation_head())}</tr>",
            *(_operation_html(row) for row in operation_summary(group)),
            "</table>",
        ]
    return parts


def _scenario_cells_html(r: ScenarioResult) -> str:
    pairs = [r.pair(p.left, p.right) for p in shown_pairs()]
    return (
        f"<td><a href='#{_e(_anchor(r))}'>{_opens_count(r)}</a>"
        + "".join(f"<td class='{x.status}'>{_e(x.status)}" for x in pairs)
        + "".join(_outcome_html(r, o) for o in by_outcome())
        + f"<td class='{r.status}'>{_e(r.status)}"
    )


def _scenarios_html(results: list[ScenarioResult]) -> list[str]:
    versions = versions_of(results)
    width = _scenario_columns()
    head = "".join(f"<th colspan={width}>QEMU {_e(v)}" for v in versions)
    sub = _th(_scenario_head()) * len(versions)
    parts = [
        "<h2>Scenarios</h2>",
        f"<table><tr><th rowspan=2>scenario{head}<th rowspan=2>time</tr><tr>{sub}</tr>",
    ]
    for name, per in rows(results):
        cells = [f"<tr><td>{_e(name)}"]
        for v in versions:
            r = per.get(v)
            cells.append("<td>-" * width if r is None else _scenario_cells_html(r))
        cells.append(f"<td>{sum(r.seconds for r in per.values()):.1f}s</tr>")
        parts.append("".join(cells))
    return parts


def _divergences_html() -> list[str]:
    parts = [
        "</table><h2>Known divergences</h2><table><tr><th>key<th>pair<th>applies to<th>reason</tr>"
    ]
    for k in KNOWN_DIVERGENCES:
        parts.append(
            f"<tr><td>{_e(k.key)}<td>{_e(' vs '.join(k.pair))}"
            f"<td>{_e(k.tag or 'every scenario')}<td>{_e(k.reason)}</tr>"
        )
    return parts


def _details_html(r: ScenarioResult, differ: difflib.HtmlDiff) -> list[str]:
    parts = [
        f"<h3 id='{_e(_anchor(r))}'>{_e(r.scenario.name)} on QEMU {_e(r.qemu_version)} — "
        f"<span class='{r.status}'>{_e(r.status)}</span></h3><ul>",
        *(f"<li>{o.name}: {_e(_ops(r, o.name))}</li>" for o in listed()),
        "</ul>",
    ]
    for pair in r.pairs:
        a, b = r.oracles.get(pair.left), r.oracles.get(pair.right)
        if pair.status in (Status.MISMATCH, Status.KNOWN) and a is not None and b is not None:
            parts.append(
                f"<p>{_e(pair.left)} vs {_e(pair.right)}: {_e(pair.status)} "
                f"{_e(', '.join(pair.divergences))}</p>"
            )
            parts.append(differ.make_table(lines(a.trace), lines(b.trace), pair.left, pair.right))
    p = r.oracles.get(reference().name)
    if p is not None and p.trace:
        parts.append("<pre>" + _e("\n".join(lines(p.trace))) + "</pre>")
    return parts


def write_html(path: Path, results: list[ScenarioResult], meta: dict[str, Any]) -> None:
    """The HTML report, section by section (the same sections as the Markdown one)."""
    differ = difflib.HtmlDiff(wrapcolumn=70)
    parts = [
        *_versions_html(results, meta),
        *_differences_html(results),
        *_operations_html(results),
        *_scenarios_html(results),
        *_divergences_html(),
        "</table><h2>Details</h2>",
    ]
    for r in results:
        parts += _details_html(r, differ)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")
