"""Show a benchmark report: a rich table, a JSON file, PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from testbed.bench.results import Result
from testbed.bench.runner import Report


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def results_table(report: Report) -> Table:
    m = report.machine
    table = Table(
        title=f"fd passing on {m.get('cpu_model')} ({m.get('nproc')} CPUs, "
        f"kernel {m.get('kernel')}, Python {m.get('python')})"
    )
    for col in ("transport", "clients", "placement", "ops/s", "min-max", "noise %"):
        table.add_column(col, justify="left" if col in ("transport", "placement") else "right")
    for col in ("p50 us", "p95 us", "p99 us", "broker CPU us/op"):
        table.add_column(col, justify="right")
    for r in report.results:
        if r.skipped is not None:
            table.add_row(r.transport, str(r.clients), r.placement, f"skipped: {r.skipped}")
            continue
        table.add_row(
            r.transport,
            str(r.clients),
            r.placement,
            _num(r.ops_per_s),
            f"{_num(r.ops_per_s_min)}-{_num(r.ops_per_s_max)}",
            _num(r.noise_pct, 1),
            _num(r.p50_us, 1),
            _num(r.p95_us, 1),
            _num(r.p99_us, 1),
            _num(r.broker_cpu_us_per_op, 1),
        )
    return table


def goals_table(report: Report) -> Table:
    table = Table(title="ratios and goals")
    table.add_column("ratio")
    table.add_column("value", justify="right")
    table.add_column("goal", justify="right")
    table.add_column("met")
    targets = {g.name: g for g in report.goals}
    for name, value in report.ratios.items():
        g = targets.pop(name, None)
        met = "" if g is None else {True: "yes", False: "NO", None: "not measured"}[g.met]
        table.add_row(name, _num(value, 3), "" if g is None else g.target, met)
    for g in targets.values():
        met = {True: "yes", False: "NO", None: "not measured"}[g.met]
        table.add_row(g.name, _num(g.value, 1), g.target, met)
    return table


def print_report(report: Report, console: Console | None = None) -> None:
    if console is None:
        # a pipe or a log gets the full table rather than 80 squeezed columns
        console = Console() if Console().is_terminal else Console(width=150)
    console.print(results_table(report))
    console.print(goals_table(report))
    la0 = report.machine.get("load_average_at_start")
    la1 = report.machine.get("load_average_at_end")
    console.print(f"load average at start {la0}, at end {la1}; wall {report.wall_s:.1f}s")


def write_json(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.as_json(), indent=2) + "\n", encoding="utf-8")


def _measured(results: list[Result], transport: str) -> list[Result]:
    rows = [r for r in results if r.transport == transport and r.skipped is None]
    return sorted(rows, key=lambda r: r.clients)


def write_plots(report: Report, out_dir: Path) -> list[Path]:
    """throughput.png (ops/s vs clients) and latency.png (percentiles vs clients)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    sweep = report.plan.sweep_placement.value
    broker = [r for r in _measured(report.results, "broker") if r.placement == sweep]
    written = []

    fig, ax = plt.subplots(figsize=(8, 5))
    if broker:
        xs = [r.clients for r in broker]
        ax.errorbar(
            xs,
            [r.ops_per_s or 0 for r in broker],
            yerr=[
                [(r.ops_per_s or 0) - (r.ops_per_s_min or 0) for r in broker],
                [(r.ops_per_s_max or 0) - (r.ops_per_s or 0) for r in broker],
            ],
            marker="o",
            capsize=3,
            label=f"broker ({sweep}; bars: min-max of reps)",
        )
    # Single-client transports are drawn as levels to compare the sweep
    # against, each with its own colour and style and named in the legend
    # (labels written on the plot overlap where two levels are close).
    styles = ("--", ":", "-.")
    levels = [
        r for r in report.results if r.skipped is None and r.transport != "broker" and r.ops_per_s
    ]
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(sorted(levels, key=lambda r: -(r.ops_per_s or 0))):
        ax.axhline(
            r.ops_per_s or 0.0,
            linestyle=styles[i % len(styles)],
            linewidth=1.2,
            color=cmap((i + 3) % 10),
            label=f"{r.transport} ({r.placement}): {r.ops_per_s:,.0f}/s",
        )
    for r in _measured(report.results, "broker"):
        if r.placement != sweep:
            ax.plot([r.clients], [r.ops_per_s or 0.0], "s", label=f"broker x1 ({r.placement})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("ops/s (aggregate)")
    ax.set_title("fd passing throughput vs clients")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path = out_dir / "throughput.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(8, 5))
    if broker:
        xs = [r.clients for r in broker]
        for key in ("p50_us", "p95_us", "p99_us"):
            ax.plot(
                xs,
                [float(getattr(r, key) or 0) for r in broker],
                marker="o",
                label=f"broker {key[:3]}",
            )
    ax.axhline(2000, color="red", linestyle=":", label="2 ms goal for p99 at 64 clients")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("latency per op (us)")
    ax.set_title(f"broker latency percentiles vs clients ({sweep})")
    ax.legend(fontsize=8)
    path = out_dir / "latency.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    written.append(path)
    return written
