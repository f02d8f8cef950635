"""Per-token latency of many runs in one CSV, and one summary row per run.

`python -m tools.latency RUN_DIR... -o latency.csv [--summary summary.csv]`

RUN_DIR is a run directory or any directory above runs (every directory beneath it with
tokens.csv and meta.json is taken). The latency CSV has one row per generated token of
every run: `scenario, algorithm, seed, clock, run_dir, status`, then every tokens.csv
column as written. The summary CSV (default: `<stem>_summary.csv` beside -o) has one row
per run: its tags, status, tokens, decode latency p50/p95/p99/mean/max, prefill_ms,
stall_ms, migrations, migrated_bytes, oom, replans, tokens_match (1: every token equals
the reference and the run produced all of them), run_dir. Statistics are computed from
the CSV rows, so runs that failed part-way are summarised over the tokens they produced.
Rows are sorted by scenario, algorithm, seed, clock, run directory (and token).
Exit status: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from testbed.results.read import (
    STAT_COLUMNS,
    TAG_COLUMNS,
    Run,
    RunsError,
    add_runs_argument,
    load_runs,
    run_stats,
    token_columns,
    write_csv,
)

ROW_TAGS = [*TAG_COLUMNS, "run_dir", "status"]
SUMMARY_COLUMNS = [*TAG_COLUMNS, "status", *STAT_COLUMNS, "run_dir"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.latency",
        description="Collect the per-token latency of runs into one CSV, with a per-run summary.")
    add_runs_argument(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="per-token CSV to write")
    p.add_argument("--summary", type=Path,
                   help="per-run summary CSV (default: <stem>_summary.csv beside --output)")
    return p.parse_args(argv)


def summary_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}_summary.csv")


def token_rows(runs: list[Run], columns: list[str]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for run in runs:
        tags = {**run.tags(), "run_dir": str(run.path), "status": run.status}
        rows = sorted(run.token_file[1], key=lambda r: int(r["token"]) if r["token"].isdigit() else -1)
        out.extend({**tags, **{c: r.get(c, "") for c in columns}} for r in rows)
    return out


def summary_rows(runs: list[Run]) -> list[dict[str, object]]:
    return [{**run.tags(), "status": run.status, **run_stats(run), "run_dir": str(run.path)}
            for run in runs]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    out = Console(highlight=False, soft_wrap=True)
    summary = args.summary or summary_path(args.output)
    if summary.resolve() == args.output.resolve():
        err.print(f"error: {summary}: the summary would overwrite the per-token CSV", markup=False)
        return 2
    try:
        runs = load_runs(args.runs)
        cols = token_columns(runs)
        n = write_csv(args.output, [*ROW_TAGS, *cols], token_rows(runs, cols))
        write_csv(summary, SUMMARY_COLUMNS, summary_rows(runs))
    except RunsError as e:
        err.print(f"error: {e}", markup=False)
        return 2
    failed = sum(not r.ok for r in runs)
    note = f" ({failed} not completed)" if failed else ""
    out.print(f"{n} token rows from {len(runs)} run(s){note} -> {args.output}", markup=False)
    out.print(f"{len(runs)} summary row(s) -> {summary}", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
