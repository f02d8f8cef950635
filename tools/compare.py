"""Side-by-side table of runs, one table per scenario.

`python -m tools.compare RUN_DIR... [--csv PATH]`

RUN_DIR is a run directory or any directory above runs. For each run: algorithm, status,
decode tokens' mean/p50/p95 latency, the mean latency in each window between scenario
event tokens (the events from events.csv and the scenario in meta.json; the windows are
the same for every run of a scenario), migrations, migration stall, oom events, and
whether every token equals the reference. Statistics come from the CSV rows, so failed
runs are compared over the tokens they produced (a window a run did not finish is marked
with *). `--csv` also writes the table, one row per run (window columns are named
`mean_ms_tokens_<from>_<to>`). Exit status: 0 done, 2 bad input (one line on stderr).

An experiment directory (`python -m runners.sweep EXPERIMENT.yaml`, docs/experiments.md:
one with `summary.csv` and `experiment.yaml`) is shown as its summary instead: per cell and
algorithm the mean, 95 % interval and n of `--figure` (default latency_mean_ms).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from testbed.results.read import (
    TAG_COLUMNS,
    Run,
    RunsError,
    add_runs_argument,
    group_by_scenario,
    labels,
    load_runs,
    run_stats,
    run_windows,
    scenario_events,
    write_csv,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.compare",
        description="Compare runs side by side: latency overall and between scenario events.")
    add_runs_argument(p)
    p.add_argument("--csv", type=Path, metavar="PATH", help="also write the table as CSV")
    p.add_argument("--figure", default="latency_mean_ms",
                   help="experiment directories: the figure of summary.csv to show (default latency_mean_ms)")
    return p.parse_args(argv)


def is_experiment(path: str) -> bool:
    return (Path(path) / "summary.csv").is_file() and (Path(path) / "experiment.yaml").is_file()


def experiment_table(path: str, figure: str) -> Table:
    """An experiment directory's summary.csv for one figure: a row per cell and algorithm."""
    import csv as csv_mod

    try:
        with open(Path(path) / "summary.csv", newline="") as f:
            rows = list(csv_mod.DictReader(f))
    except (OSError, UnicodeDecodeError, csv_mod.Error) as e:
        raise RunsError(f"{path}/summary.csv: cannot read ({e})") from None
    need = ("cell", "algorithm", "figure", "n", "failed", "mean", "ci95_low", "ci95_high")
    if rows and (missing := [c for c in need if c not in rows[0]]):
        raise RunsError(f"{path}/summary.csv: no column {missing[0]!r}: not an experiment's summary")
    figures = sorted({r["figure"] for r in rows})
    if figure not in figures:
        raise RunsError(f"{path}: --figure: no figure {figure!r} in summary.csv (figures: {', '.join(figures)})")
    axes = [c for c in (rows[0] if rows else {}) if c not in (*need, "sd")]
    t = Table(title=f"{escape(Path(path).name)}: {escape(figure)}, mean [95 % interval] (n)", title_justify="left")
    for col in ("cell", *axes, "algorithm"):
        t.add_column(escape(col))
    for col in ("mean", "95 % interval", "n", "failed"):
        t.add_column(col, justify="right")

    def num(x: str) -> str:
        return "-" if x == "" else f"{float(x):.3f}"

    for r in rows:
        if r["figure"] != figure:
            continue
        ci = "-" if r["ci95_low"] == "" else f"{num(r['ci95_low'])} .. {num(r['ci95_high'])}"
        t.add_row(r["cell"], *(escape(r[a]) for a in axes), escape(r["algorithm"]), num(r["mean"]), ci, r["n"],
                  r["failed"])
    return t


def window_bounds(runs: list[Run]) -> tuple[list[int], list[tuple[int, int]]]:
    """The scenario's cut tokens (union over its runs) and the (from, to) token range of
    every window, `to` the last decode token of the longest run."""
    cuts = sorted({c for r in runs for c in r.event_tokens()})
    spans: dict[int, int] = {}
    for r in runs:
        for w in run_windows(r, cuts):
            spans[w["from_token"]] = max(spans.get(w["from_token"], w["to_token"]), w["to_token"])
    return cuts, sorted(spans.items())


def compare_rows(runs: list[Run]) -> tuple[list[tuple[int, int]], list[dict[str, Any]]]:
    """Windows of a scenario's runs and one row per run: tags, stats, `windows`
    {from_token: window dict}."""
    cuts, spans = window_bounds(runs)
    rows = []
    for r in runs:
        rows.append({**r.tags(), "status": r.status, "run_dir": str(r.path), **run_stats(r),
                     "windows": {w["from_token"]: w for w in run_windows(r, cuts)}, "run": r})
    return spans, rows


def _ms(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f} ms"


def _status(s: str) -> str:
    if s == "completed":
        return "[green]completed[/]"
    return f"[red]{escape(s if len(s) <= 60 else s[:59] + '...')}[/]"


def window_col(lo: int, hi: int) -> str:
    return f"mean_ms_tokens_{lo}_{hi}"


def table(scenario: str, runs: list[Run]) -> tuple[Table, list[dict[str, Any]], list[str]]:
    """The rich table of one scenario's runs, its rows (for the CSV) and window columns."""
    spans, rows = compare_rows(runs)
    names = labels(runs)
    events = scenario_events(runs)
    t = Table(title=f"{escape(scenario)}: {len(runs)} run(s), decode latency per token", title_justify="left")
    columns: tuple[tuple[str, Literal["left", "right"]], ...] = (
        ("algorithm", "left"), ("status", "left"), ("tokens", "right"), ("mean", "right"), ("p50", "right"),
        ("p95", "right"))
    for col, just in columns:
        t.add_column(col, justify=just, overflow="fold")
    for lo, hi in spans:
        t.add_column(f"mean\ntokens {lo}-{hi}", justify="right")
    for col in ("migrations", "stall", "oom", "tokens\nmatch"):
        t.add_column(col, justify="right")
    partial = False
    for row in rows:
        cells = [escape(names[row["run"].path]), _status(row["status"]), str(row["tokens"]), _ms(row["latency_mean_ms"]),
                 _ms(row["latency_p50_ms"]), _ms(row["latency_p95_ms"])]
        for lo, hi in spans:
            w = row["windows"].get(lo)
            if w is None:
                cells.append("-")
                continue
            short = w["to_token"] < hi
            partial |= short
            cells.append(_ms(w["mean"]) + ("*" if short else ""))
            row[window_col(lo, hi)] = w["mean"]
        cells += [str(row["migrations"]), f"{row['stall_ms']:.1f} ms", str(row["oom"]),
                  "[green]yes[/]" if row["tokens_match"] else "[red]no[/]"]
        t.add_row(*cells)
    notes = []
    if events:
        notes.append("events: " + "; ".join(f"before token {k}: {text}" for k, text in events))
    if partial:
        notes.append("* the run ended inside this window: mean over the tokens it produced")
    if notes:
        t.caption = escape("\n".join(notes))
        t.caption_justify = "left"
    return t, rows, [window_col(lo, hi) for lo, hi in spans]


CSV_HEAD = [*TAG_COLUMNS, "status", "tokens", "latency_mean_ms", "latency_p50_ms", "latency_p95_ms"]
CSV_TAIL = ["migrations", "stall_ms", "oom", "tokens_match", "run_dir"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    out = Console(highlight=False)
    if not out.is_terminal:  # logs and pipes: wide enough for the table
        out = Console(highlight=False, width=160)
    experiments = [p for p in args.runs if is_experiment(p)]
    args.runs = [p for p in args.runs if p not in experiments]
    try:
        for path in experiments:
            out.print(experiment_table(path, args.figure))
        if not args.runs:
            return 0
        runs = load_runs(args.runs)
        all_rows: list[dict[str, Any]] = []
        window_cols: list[str] = []
        tables = []
        for scenario, group in group_by_scenario(runs):
            t, rows, wcols = table(scenario, group)
            tables.append(t)
            all_rows += rows
            window_cols += [c for c in wcols if c not in window_cols]
        if args.csv:
            write_csv(args.csv, [*CSV_HEAD, *window_cols, *CSV_TAIL], all_rows)
    except RunsError as e:
        err.print(f"error: {e}", markup=False)
        return 2
    for t in tables:
        out.print(t)
    if args.csv:
        out.print(f"{len(all_rows)} row(s) -> {args.csv}", markup=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
