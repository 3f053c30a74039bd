"""Show a benchmark report: rich tables, the goals with their spreads, JSON, PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from testbed.bench.goals import Verdict
from testbed.bench.results import Row
from testbed.bench.runner import Report
from testbed.bench.stats import Spread

#: figure name -> (column title, digits)
COLUMNS = {
    "ops_per_s": ("ops/s", 0),
    "p50_us": ("p50 us", 1),
    "p99_us": ("p99 us", 1),
    "server_cpu_us_per_op": ("server CPU us/op", 1),
    "qemu_cpu_us_per_op": ("QEMU CPU us/op", 1),
    "ms": ("ms", 2),
}


def _num(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def _cell(s: Spread, digits: int) -> str:
    return f"{_num(s.median, digits)} [{_num(s.low, digits)}-{_num(s.high, digits)}]"


def experiment_table(name: str, rows: list[Row]) -> Table:
    figures = [k for k in COLUMNS if any(k in r.figures for r in rows)]
    versions = any(r.qemu_version for r in rows)
    table = Table(title=f"{name}: median \\[min-max] over repetitions")
    table.add_column("transport")
    if versions:
        table.add_column("QEMU")
    table.add_column("setting")
    for k in figures:
        table.add_column(COLUMNS[k][0], justify="right")
    for r in rows:
        head = [r.transport, *([r.qemu_version or "-"] if versions else []), r.setting]
        if r.skipped:
            table.add_row(*head, f"skipped: {r.skipped}")
            continue
        table.add_row(
            *head,
            *[_cell(r.figures[k], COLUMNS[k][1]) if k in r.figures else "-" for k in figures],
        )  # fmt: skip
    return table


def goals_table(verdicts: list[Verdict]) -> Table:
    table = Table(title="goals: each ratio the median of per-repetition ratios")
    for col, justify in (("ratio", "left"), ("goal", "right"), ("value", "right"),
                         ("min-max", "right"), ("reps", "right"), ("met", "left")):  # fmt: skip
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for v in verdicts:
        if v.value is None:
            table.add_row(v.key, v.text, "-", "-", "-", f"not measured: {v.reason}")
            continue
        s = v.value
        table.add_row(
            v.key, v.text, f"{s.median:.3f}", f"{s.low:.3f}-{s.high:.3f}", str(s.n),
            "-" if v.met is None else "yes" if v.met else "NO",
        )  # fmt: skip
    return table


def print_report(report: Report, console: Console | None = None) -> None:
    if console is None:
        # a pipe or a log gets the full table rather than 80 squeezed columns
        console = Console() if Console().is_terminal else Console(width=160)
    m = report.machine
    console.print(
        f"fd passing on {m.get('cpu_model')} ({m.get('nproc')} CPUs, kernel {m.get('kernel')}, "
        f"Python {m.get('python')}), {report.plan.reps} interleaved repetitions"
    )
    floor = report.floor.get("syscalls")
    if isinstance(floor, list) and floor:
        calls = ", ".join(str(x) for x in floor)
        console.print(f"python_floor per request (from strace of the broker): {calls}")
    elif report.floor.get("error"):
        console.print(f"python_floor: {report.floor['error']}")
    by_experiment: dict[str, list[Row]] = {}
    for r in report.outcome.rows:
        by_experiment.setdefault(r.experiment, []).append(r)
    for name, rows in by_experiment.items():
        console.print(experiment_table(name, rows))
    console.print(goals_table(report.verdicts))
    la0, la1 = m.get("load_average_at_start"), m.get("load_average_at_end")
    console.print(f"load average at start {la0}, at end {la1}; wall {report.wall_s:.1f}s")


def write_json(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")


def _rows(report: Report, experiment: str) -> list[Row]:
    return [r for r in report.outcome.rows if r.experiment == experiment and not r.skipped]


def write_plots(report: Report, out_dir: Path) -> list[Path]:
    """startup.png (time vs chain depth), throughput.png and latency.png (vs clients)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for plot in (_plot_startup, _plot_throughput, _plot_latency):
        fig = plot(report, plt)
        if fig is None:
            continue
        name, figure = fig
        path = out_dir / name
        figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


def _plot_startup(report: Report, plt: Any) -> tuple[str, Any] | None:
    per_layer = report.outcome.extra.get("startup_ms_per_layer", {})
    startup: dict[str, list[tuple[int, Spread]]] = {}
    for r in _rows(report, "startup"):
        if r.setting.startswith("depth "):
            depth = int(r.setting.split(",")[0].split()[1])
            startup.setdefault(r.transport, []).append((depth, r.figures["ms"]))
    if not startup:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in startup.items():
        points.sort()
        xs = [d for d, _ in points]
        ys = [s.median for _, s in points]
        err = [[s.median - s.low for _, s in points], [s.high - s.median for _, s in points]]
        slope = per_layer.get(name, {}) if isinstance(per_layer, dict) else {}
        label = name
        if isinstance(slope, dict) and "median" in slope:
            label += f" ({slope['median']:.2f} ms/layer)"
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("backing chain depth (qcow2 files)")
    ax.set_ylabel("spawn to QMP greeting (ms)")
    ax.set_title("QEMU -S start-up vs chain depth (median, bars: min-max of reps)")
    ax.legend(fontsize=8)
    return "startup.png", fig


def _sweep(report: Report) -> tuple[list[int], list[Row]]:
    # the plots are against the client count, for the unpinned pools (all counts)
    unpinned = [r for r in _rows(report, "sweep") if r.setting.endswith(" unpinned")]
    sweep = sorted(unpinned, key=lambda r: int(r.setting.split()[0]))
    return [int(r.setting.split()[0]) for r in sweep], sweep


def _plot_throughput(report: Report, plt: Any) -> tuple[str, Any] | None:
    xs, sweep = _sweep(report)
    if not sweep:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    ops = [r.figures["ops_per_s"] for r in sweep]
    ax.errorbar(xs, [s.median for s in ops],
                yerr=[[s.median - s.low for s in ops], [s.high - s.median for s in ops]],
                marker="o", capsize=3, label="broker (unpinned)")  # fmt: skip
    for r in _rows(report, "pingpong"):
        if r.setting == "same-core":
            ax.axhline(r.figures["ops_per_s"].median, linestyle=":", linewidth=1,
                       label=f"{r.transport} x1 (same-core)", color=None)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("ops/s (aggregate)")
    ax.set_title("fd passing throughput vs clients")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return "throughput.png", fig


def _plot_latency(report: Report, plt: Any) -> tuple[str, Any] | None:
    xs, sweep = _sweep(report)
    if not sweep:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for key in ("p50_us", "p99_us"):
        ax.plot(xs, [r.figures[key].median for r in sweep], marker="o",
                label=f"broker {key[:3]}")  # fmt: skip
    little = [n / r.figures["ops_per_s"].median * 1e6 for n, r in zip(xs, sweep, strict=True)]
    ax.plot(xs, little, linestyle="--", label="Little's mean: N / throughput")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("latency per op (us)")
    ax.set_title("broker latency vs clients (unpinned)")
    ax.legend(fontsize=8)
    return "latency.png", fig


BEGIN = "<!-- bench results: begin (testbed bench --markdown) -->"
END = "<!-- bench results: end -->"
#: the ratios alone (the README's table)
RATIOS_BEGIN = "<!-- bench ratios: begin (testbed bench --markdown) -->"
RATIOS_END = "<!-- bench ratios: end -->"


def _md_cell(s: Spread, digits: int) -> str:
    return f"{_num(s.median, digits)} ({_num(s.low, digits)}-{_num(s.high, digits)})"


def _md_run(report: Report) -> str:
    m = report.machine
    la0, la1 = m.get("load_average_at_start"), m.get("load_average_at_end")
    versions = ", ".join(report.plan.qemu_versions)
    return (
        f"Run of {m.get('date', '')}: {m.get('cpu_model')}, {m.get('nproc')} CPUs, kernel "
        f"{m.get('kernel')}, Python {m.get('python')}; QEMU {versions}; {report.plan.reps} "
        f"interleaved repetitions; load average {la0} at start, {la1} at end; "
        f"{report.wall_s:.0f} s."
    )


def _md_ratios(report: Report) -> list[str]:
    lines = ["| ratio | goal | median | min-max | reps | met |", "|---|---:|---:|---:|---:|---|"]
    for v in report.verdicts:
        if v.value is None:
            lines.append(f"| `{v.key}` | {v.text} | - | - | - | not measured: {v.reason} |")
            continue
        s = v.value
        met = "-" if v.met is None else "yes" if v.met else "**no**"
        lines.append(
            f"| `{v.key}` | {v.text} | {s.median:.3f} | {s.low:.3f}-{s.high:.3f} | {s.n} | {met} |"
        )
    return lines


def markdown(report: Report) -> str:
    """The results section of docs/bench.md: the run, the ratios, every experiment's table."""
    lines = [BEGIN, "", _md_run(report), "", *_md_ratios(report)]
    floor = report.floor.get("syscalls")
    if isinstance(floor, list):
        lines += ["", "`python_floor` per request: " + ", ".join(f"`{x}`" for x in floor) + "."]
    by_experiment: dict[str, list[Row]] = {}
    for r in report.outcome.rows:
        by_experiment.setdefault(r.experiment, []).append(r)
    for name, rows in by_experiment.items():
        lines += ["", f"**{name}** (median (min-max) over repetitions)", ""]
        lines += _md_rows(rows)
    lines += ["", END]
    return "\n".join(lines) + "\n"


def ratios_markdown(report: Report) -> str:
    """The README's section: the run and the ratios table only."""
    lines = [RATIOS_BEGIN, "", _md_run(report), "", *_md_ratios(report), "", RATIOS_END]
    return "\n".join(lines) + "\n"


def _md_rows(rows: list[Row]) -> list[str]:
    """One experiment's markdown table (a QEMU column when its rows have versions)."""
    figures = [k for k in COLUMNS if any(k in r.figures for r in rows)]
    versions = any(r.qemu_version for r in rows)
    head = "| transport | " + ("QEMU | " if versions else "") + "setting | "
    lines = [head + " | ".join(COLUMNS[k][0] for k in figures) + " |"]
    lines.append("|---|" + ("---|" if versions else "") + "---|" + "---:|" * len(figures))
    for r in rows:
        start = f"| {r.transport} | " + (f"{r.qemu_version or '-'} | " if versions else "")
        if r.skipped:
            lines.append(f"{start}{r.setting} | skipped: {r.skipped} |")
            continue
        cells = [_md_cell(r.figures[k], COLUMNS[k][1]) if k in r.figures else "-"
                 for k in figures]  # fmt: skip
        lines.append(f"{start}{r.setting} | " + " | ".join(cells) + " |")
    return lines


def write_markdown(report: Report, path: Path) -> None:
    """Replace the section of ``path`` between the results markers (docs/bench.md: every
    table) or the ratios markers (the README: the ratios), or write the results alone."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    for begin, end, section in (
        (BEGIN, END, markdown),
        (RATIOS_BEGIN, RATIOS_END, ratios_markdown),
    ):
        if begin in text and end in text:
            head, _, rest = text.partition(begin)
            _, _, tail = rest.partition(end)
            text = head + section(report).rstrip("\n") + tail
            break
    else:
        text = markdown(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
