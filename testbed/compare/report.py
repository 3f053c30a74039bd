"""The comparison's outputs: a terminal table, a JSON file, a Markdown and an HTML report."""

from __future__ import annotations

import difflib
import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from testbed.compare.compare import KNOWN, KNOWN_DIVERGENCES, MATCH, MISMATCH, SKIPPED
from testbed.compare.run import ScenarioResult
from testbed.compare.trace import lines
from testbed.compare.versions import by_version, compared, differences, rows, versions_of

_STYLE = {MATCH: "green", KNOWN: "yellow", MISMATCH: "bold red", SKIPPED: "dim"}
_WORD = {MATCH: "=", KNOWN: "known", MISMATCH: "MISMATCH", SKIPPED: "skipped"}


def _cell(status: str) -> str:
    return f"[{_STYLE[status]}]{_WORD[status]}[/]"


def _fdset_cell(r: ScenarioResult) -> str:
    fd = r.oracles.get("fdset")
    if fd is None or fd.skipped:
        return "[dim]skipped[/]"
    return "[green]works[/]" if fd.ok else "[yellow]fails[/]"


def terminal_table(results: list[ScenarioResult]) -> Table:
    """One row per scenario, one column group per QEMU version."""
    versions = versions_of(results)
    table = Table(title="open-hook-fd: model vs patched QEMU vs stock QEMU vs fd sets")
    table.add_column("scenario")
    for v in versions:
        for col in ("opens", "model=QEMU", "QEMU=stock", "fd sets", "status"):
            table.add_column(f"{v} {col}", justify="right" if col == "opens" else "left")
    table.add_column("time", justify="right")
    for name, per in rows(results):
        cells = [name]
        for v in versions:
            r = per.get(v)
            if r is None:
                cells += ["-"] * 5
                continue
            p = r.oracles.get("patched")
            cells += [
                str(len(p.trace)) if p else "-",
                _cell(r.pair("model", "patched").status),
                _cell(r.pair("patched", "stock").status),
                _fdset_cell(r),
                _cell(r.status),
            ]
        cells.append(f"{sum(r.seconds for r in per.values()):.1f}s")
        table.add_row(*cells)
    return table


def summary(results: list[ScenarioResult]) -> dict[str, Any]:
    fd = [r.oracles["fdset"] for r in results if "fdset" in r.oracles]
    return {
        "scenarios": len(results),
        "status": dict(Counter(r.status for r in results)),
        "model_vs_patched": dict(Counter(r.pair("model", "patched").status for r in results)),
        "patched_vs_stock": dict(Counter(r.pair("patched", "stock").status for r in results)),
        "fdset_works": sum(1 for f in fd if f.ok),
        "fdset_fails": sum(1 for f in fd if not f.ok and not f.skipped),
        #: summed over scenarios (more than the wall time with --jobs > 1)
        "scenario_seconds": round(sum(r.seconds for r in results), 1),
    }


def _reasons(entries: list[str]) -> list[str]:
    """The "(why)" parts of fd-set pre-open entries: what had to be O_RDWR and why."""
    out = []
    for e in entries:
        if "(" in e and "O_RDWR" in e:
            out += [w.strip() for w in e.split("(", 1)[1].split(")", 1)[0].split(";")]
    return out


def operation_summary(results: list[ScenarioResult]) -> list[dict[str, Any]]:
    """One row per operation: the hook, fd sets (and seccomp), what the fd-set side needed."""
    groups: dict[str, list[ScenarioResult]] = {}
    for r in results:
        groups.setdefault(r.scenario.operation, []).append(r)
    rows = []
    for op, group in groups.items():
        fds = [r.oracles["fdset"] for r in group if "fdset" in r.oracles]
        sec = [r.oracles["seccomp"] for r in group if "seccomp" in r.oracles]
        hook_ok = sum(
            1
            for r in group
            if r.pair("model", "patched").status == MATCH
            and r.pair("patched", "stock").status in (MATCH, KNOWN)
        )
        reasons: Counter[str] = Counter()
        created: Counter[str] = Counter()
        headers = []
        errors: Counter[str] = Counter()
        for f in fds:
            reasons.update(dict.fromkeys(_reasons(f.extra.get("preopened", [])), 1))
            made = [c.partition(" ")[2] or c for c in f.extra.get("created", [])]
            created.update(dict.fromkeys(made, 1))
            headers.append(len(f.extra.get("headers", [])))
            if not f.ok and not f.skipped:
                errors[short_error(f.first_error)[:140]] += 1
        rows.append(
            {
                "operation": op,
                "scenarios": len(group),
                "status": dict(Counter(r.status for r in group)),
                "hook": f"{hook_ok}/{len(group)}",
                "fdset_works": sum(1 for f in fds if f.ok),
                "fdset_fails": sum(1 for f in fds if not f.ok and not f.skipped),
                "seccomp": (f"{sum(1 for x in sec if x.ok)}/{len(sec)} work" if sec else "not run"),
                "preopened_rdwr": [f"{k} ({n})" for k, n in reasons.most_common()],
                "created": [f"{k} ({n})" for k, n in created.most_common()],
                "headers_parsed": (
                    f"{min(headers)}-{max(headers)} per scenario" if headers else "-"
                ),
                "fdset_errors": [f"{k} ({n})" for k, n in errors.most_common(3)],
            }
        )
    return rows


def operation_table(results: list[ScenarioResult]) -> Table:
    table = Table(title="per operation: the hook vs fd sets")
    cols = ("operation", "scen.", "hook", "fd sets", "seccomp", "pre-opened O_RDWR for", "headers")
    for col in cols:
        table.add_column(col)
    for row in operation_summary(results):
        table.add_row(
            row["operation"],
            str(row["scenarios"]),
            row["hook"],
            f"{row['fdset_works']} work, {row['fdset_fails']} fail",
            row["seccomp"],
            "; ".join(row["preopened_rdwr"])[:120] or "-",
            row["headers_parsed"],
        )
    return table


def summary_line(version: str, results: list[ScenarioResult]) -> str:
    s = summary(results)
    return (
        f"QEMU {version}: {s['scenarios']} scenarios: "
        + ", ".join(f"{n} {k}" for k, n in sorted(s["status"].items()))
        + f"; fd sets work in {s['fdset_works']}, fail in {s['fdset_fails']}"
    )


def differences_line(results: list[ScenarioResult]) -> str:
    versions = versions_of(results)
    if len(versions) < 2:
        return ""
    diffs = differences(results)
    opens = sum(1 for d in diffs if d.opens)
    fdsets = sum(1 for d in diffs if d.fdset)
    return (
        f"between versions ({' vs '.join(versions)}, {compared(results)} scenarios compared): "
        f"opens differ in {opens}, fd-set results in {fdsets}, "
        f"status in {sum(1 for d in diffs if d.status)}"
    )


def print_summary(console: Console, results: list[ScenarioResult], wall: float) -> None:
    console.print(terminal_table(results))
    for v, group in by_version(results).items():
        table = operation_table(group)
        table.title = f"QEMU {v}, per operation: the hook vs fd sets"
        console.print(table)
    for d in differences(results):
        what = [f"{o} opens differ" for o in d.opens]
        if d.fdset:
            what.append(f"fd sets: {d.fdset[0][:80]} -> {d.fdset[1][:80]}")
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


def _binaries(meta: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(version, patched, stock) from the run's meta."""
    return [
        (v, b.get("patched", ""), b.get("stock", "")) for v, b in meta.get("binaries", {}).items()
    ]


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _fd_md(r: ScenarioResult) -> str:
    fd = r.oracles.get("fdset")
    if fd is None or fd.skipped:
        return "skipped"
    return "works" if fd.ok else "fails: " + _md(fd.first_error)[:160]


def _differences_md(results: list[ScenarioResult]) -> list[str]:
    versions = versions_of(results)
    if len(versions) < 2:
        return []
    diffs = differences(results)
    out = [
        "## Between versions",
        "",
        f"{compared(results)} scenarios ran on {', '.join(versions)}; against {versions[0]}, "
        f"what is opened differs in {sum(1 for d in diffs if d.opens)}, the fd-set result "
        f"in {sum(1 for d in diffs if d.fdset)}, the status in "
        f"{sum(1 for d in diffs if d.status)}.",
        "",
    ]
    for d in diffs:
        out.append(f"### {d.scenario}: {d.base} → {d.version}")
        out.append("")
        if d.status:
            out += [f"status: {d.status[0]} → {d.status[1]}", ""]
        if d.fdset:
            out += [f"fd sets: {_md(d.fdset[0])} → {_md(d.fdset[1])}", ""]
        for oracle, diff in d.opens.items():
            out += [f"{oracle} opens:", "", "```diff", *diff, "```", ""]
    return out


def write_markdown(path: Path, results: list[ScenarioResult], meta: dict[str, Any]) -> None:
    """The Markdown report, section by section.

    Longer than 60 lines on purpose: a template written in the order the document reads; split,
    the sections would lose the order they print in.
    """
    groups = by_version(results)
    versions = list(groups)
    out = [
        "# open-hook-fd comparison report",
        "",
        f"Run {meta.get('started', '')}; {len(results)} scenario runs on QEMU "
        f"{', '.join(versions)} in {meta.get('wall_seconds', '?')} s.",
        "",
        "| QEMU | patched | stock | scenarios | status | fd sets |",
        "|---|---|---|---|---|---|",
    ]
    paths = {v: (pa, st) for v, pa, st in _binaries(meta)}
    for v, group in groups.items():
        s = summary(group)
        pa, st = paths.get(v, ("", ""))
        out.append(
            f"| {v} | `{pa}` | `{st}` | {s['scenarios']} | "
            + ", ".join(f"{n} {k}" for k, n in sorted(s["status"].items()))
            + f" | work in {s['fdset_works']}, fail in {s['fdset_fails']} |"
        )
    out += ["", *_differences_md(results)]
    for v, group in groups.items():
        out += [
            f"## Per operation, QEMU {v}",
            "",
            "hook: scenarios where model = patched QEMU and patched = stock QEMU (or a known "
            "divergence); fd sets: scenarios where every step worked with only `/dev/fdset/N` "
            "names; what the fd-set side (the testbed as libvirt) had to pre-open read-write, "
            "create, and how many image headers it parsed per scenario.",
            "",
            "| operation | scenarios | hook | fd sets | seccomp | pre-opened O_RDWR for | "
            "created beforehand | headers parsed | fd-set errors |",
            "|---|---|---|---|---|---|---|---|---|",
            *(
                f"| {row['operation']} | {row['scenarios']} | {row['hook']} | "
                f"{row['fdset_works']} work, {row['fdset_fails']} fail | {row['seccomp']} | "
                f"{'; '.join(row['preopened_rdwr']) or '-'} | "
                f"{'; '.join(row['created']) or '-'} | {row['headers_parsed']} | "
                + (_md("; ".join(row["fdset_errors"])) or "-")
                + " |"
                for row in operation_summary(group)
            ),
            "",
        ]
    head = ["scenario"]
    for v in versions:
        head += [f"{v} opens", f"{v} model = patched", f"{v} patched = stock", f"{v} fd sets",
                 f"{v} status"]  # fmt: skip
    out += [
        "## Scenarios",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, per in rows(results):
        cells = [name]
        for v in versions:
            r = per.get(v)
            if r is None:
                cells += ["-"] * 5
                continue
            p = r.oracles.get("patched")
            pr = [r.pair("model", "patched"), r.pair("patched", "stock")]
            cells += [
                f"[{len(p.trace) if p else '-'}](#{_anchor(r)})",
                *(x.status + (f" ({', '.join(x.divergences)})" if x.divergences else "")
                  for x in pr),
                _fd_md(r),
                r.status,
            ]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        "## Known divergences",
        "",
        "| key | pair | applies to | reason |",
        "|---|---|---|---|",
    ]
    for k in KNOWN_DIVERGENCES:
        out.append(
            f"| {k.key} | {' vs '.join(k.pair)} | {k.tag or 'every scenario'} | {k.reason} |"
        )
    out += ["", "## Details", ""]
    for r in results:
        out += [
            f'<a id="{_anchor(r)}"></a>',
            "",
            f"### {r.scenario.name} on QEMU {r.qemu_version}",
            "",
            f"image `{r.scenario.image or r.scenario.main}` "
            f"({r.image.format if r.image else 'recipe'}"
            f"{', ' + r.image.subformat if r.image and r.image.subformat else ''}), "
            f"attach `{r.scenario.attach}`, grant `{r.scenario.grant}`, steps "
            f"`{'; '.join(r.scenario.operations)}` ({r.scenario.source}) — **{r.status}**",
            "",
        ]
        for oracle in ("model", "patched", "stock", "fdset"):
            out.append(f"- {oracle}: {_ops(r, oracle)}")
        out.append("")
        p = r.oracles.get("patched")
        if p is not None and p.trace:
            out += [
                "Patched QEMU's opens (broker audit, normalised):",
                "",
                "```",
                *lines(p.trace),
                "```",
                "",
            ]
        for pair in r.pairs:
            if pair.diff:
                out += [
                    f"{pair.left} vs {pair.right}: {pair.status}"
                    + (f" ({', '.join(pair.divergences)})" if pair.divergences else ""),
                    "",
                    "```diff",
                    *pair.diff,
                    "```",
                    "",
                ]
            elif pair.status == SKIPPED:
                out += [f"{pair.left} vs {pair.right}: skipped ({pair.why_skipped})", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")


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


def short_error(text: str) -> str:
    """``op: <QEMU's last message>``: an fd-set failure without QEMU's option echo."""
    op, _, rest = text.partition(": ")
    if not rest:
        return text
    parts = rest.split(": ")
    last = parts[-1]
    # "Could not open 'X': Permission denied" needs its last two parts; an
    # echo of QEMU's option ("-drive if=none,...") or program name does not.
    if len(parts) >= 2 and len(last) < 40:
        before = parts[-2]
        if not before.startswith("-") and "=" not in before and " " in before:
            last = f"{before}: {last}"
    return f"{op}: {last}"


def _fd_html(r: ScenarioResult) -> str:
    e = html.escape
    fd = r.oracles.get("fdset")
    if fd is None or fd.skipped:
        return "<td class='skipped'>skipped"
    if fd.ok:
        return "<td class='fd-works'>works"
    # The full error (with QEMU's whole option string) is in the tooltip.
    return (
        f"<td class='fd-fails' title='{e(fd.first_error)}'>fails: {e(short_error(fd.first_error))}"
    )


def _differences_html(results: list[ScenarioResult]) -> list[str]:
    e = html.escape
    versions = versions_of(results)
    if len(versions) < 2:
        return []
    diffs = differences(results)
    parts = [
        "<h2>Between versions</h2>",
        f"<p>{compared(results)} scenarios ran on {e(', '.join(versions))}; against "
        f"{e(versions[0])}, what is opened differs in {sum(1 for d in diffs if d.opens)}, "
        f"the fd-set result in {sum(1 for d in diffs if d.fdset)}, the status in "
        f"{sum(1 for d in diffs if d.status)}.</p>",
    ]
    for d in diffs:
        parts.append(f"<h3>{e(d.scenario)}: {e(d.base)} → {e(d.version)}</h3><ul>")
        if d.status:
            parts.append(f"<li>status: {e(d.status[0])} → {e(d.status[1])}</li>")
        if d.fdset:
            parts.append(f"<li>fd sets: {e(d.fdset[0])} → {e(d.fdset[1])}</li>")
        parts.append("</ul>")
        for oracle, diff in d.opens.items():
            parts.append(f"<p>{e(oracle)} opens:</p><pre>" + e("\n".join(diff)) + "</pre>")
    return parts


def write_html(path: Path, results: list[ScenarioResult], meta: dict[str, Any]) -> None:
    """The HTML report, section by section.

    Longer than 60 lines on purpose: a template written in the order the document reads; split,
    the sections would lose the order they print in.
    """
    e = html.escape
    groups = by_version(results)
    versions = list(groups)
    differ = difflib.HtmlDiff(wrapcolumn=70)
    paths = {v: (pa, st) for v, pa, st in _binaries(meta)}
    parts = [
        f"<!doctype html><meta charset=utf-8><title>open-hook-fd comparison</title>"
        f"<style>{_CSS}</style><h1>open-hook-fd comparison report</h1>",
        f"<p>Run {e(str(meta.get('started', '')))}; {len(results)} scenario runs on QEMU "
        f"{e(', '.join(versions))} in {meta.get('wall_seconds', '?')} s.</p>",
        "<table><tr><th>QEMU<th>patched<th>stock<th>scenarios<th>status<th>fd sets</tr>",
    ]
    for v, group in groups.items():
        s = summary(group)
        pa, st = paths.get(v, ("", ""))
        parts.append(
            f"<tr><td>{e(v)}<td>{e(pa)}<td>{e(st)}<td>{s['scenarios']}<td>"
            + e(", ".join(f"{n} {k}" for k, n in sorted(s["status"].items())))
            + f"<td>work in {s['fdset_works']}, fail in {s['fdset_fails']}</tr>"
        )
    parts.append("</table>")
    parts += _differences_html(results)
    for v, group in groups.items():
        parts += [
            f"<h2>Per operation, QEMU {e(v)}</h2><table><tr><th>operation<th>scenarios<th>hook"
            "<th>fd sets<th>seccomp<th>pre-opened O_RDWR for<th>created beforehand"
            "<th>headers parsed<th>fd-set errors</tr>",
            *(
                f"<tr><td>{e(row['operation'])}<td>{row['scenarios']}<td>{e(row['hook'])}"
                f"<td>{row['fdset_works']} work, {row['fdset_fails']} fail"
                f"<td>{e(row['seccomp'])}<td>{e('; '.join(row['preopened_rdwr']) or '-')}"
                f"<td>{e('; '.join(row['created']) or '-')}<td>{e(row['headers_parsed'])}"
                f"<td>{e('; '.join(row['fdset_errors']) or '-')}</tr>"
                for row in operation_summary(group)
            ),
            "</table>",
        ]
    head = "".join(f"<th colspan=5>QEMU {e(v)}" for v in versions)
    sub = "<th>opens<th>model = patched<th>patched = stock<th>fd sets<th>status" * len(versions)
    parts += [
        "<h2>Scenarios</h2>",
        f"<table><tr><th rowspan=2>scenario{head}<th rowspan=2>time</tr><tr>{sub}</tr>",
    ]
    for name, per in rows(results):
        cells = [f"<tr><td>{e(name)}"]
        for v in versions:
            r = per.get(v)
            if r is None:
                cells.append("<td>-" * 5)
                continue
            p = r.oracles.get("patched")
            mp, ps = r.pair("model", "patched"), r.pair("patched", "stock")
            cells.append(
                f"<td><a href='#{e(_anchor(r))}'>{len(p.trace) if p else '-'}</a>"
                f"<td class='{mp.status}'>{e(mp.status)}<td class='{ps.status}'>{e(ps.status)}"
                f"{_fd_html(r)}<td class='{r.status}'>{e(r.status)}"
            )
        cells.append(f"<td>{sum(r.seconds for r in per.values()):.1f}s</tr>")
        parts.append("".join(cells))
    parts.append(
        "</table><h2>Known divergences</h2><table><tr><th>key<th>pair<th>applies to<th>reason</tr>"
    )
    for k in KNOWN_DIVERGENCES:
        parts.append(
            f"<tr><td>{e(k.key)}<td>{e(' vs '.join(k.pair))}"
            f"<td>{e(k.tag or 'every scenario')}<td>{e(k.reason)}</tr>"
        )
    parts.append("</table><h2>Details</h2>")
    for r in results:
        parts.append(
            f"<h3 id='{e(_anchor(r))}'>{e(r.scenario.name)} on QEMU {e(r.qemu_version)} — "
            f"<span class='{r.status}'>{e(r.status)}</span></h3><ul>"
        )
        for oracle in ("model", "patched", "stock", "fdset"):
            parts.append(f"<li>{oracle}: {e(_ops(r, oracle))}</li>")
        parts.append("</ul>")
        for pair in r.pairs:
            a, b = r.oracles.get(pair.left), r.oracles.get(pair.right)
            if pair.status in (MISMATCH, KNOWN) and a is not None and b is not None:
                parts.append(
                    f"<p>{e(pair.left)} vs {e(pair.right)}: {e(pair.status)} "
                    f"{e(', '.join(pair.divergences))}</p>"
                )
                parts.append(
                    differ.make_table(lines(a.trace), lines(b.trace), pair.left, pair.right)
                )
        p = r.oracles.get("patched")
        if p is not None and p.trace:
            parts.append("<pre>" + e("\n".join(lines(p.trace))) + "</pre>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")
