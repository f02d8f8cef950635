"""One self-contained HTML file of runs: the live view's page with the data inline.

`python -m tools.report RUN_DIR_OR_PARENT... -o report.html [--title T]`

The same page as tools/view.py (latency overlaid, per run its placement, memory, links and
events, a token slider), its script, stylesheet and the runs' rows all inside the one
file: it opens from disk with no server and no network, to attach to a paper or an issue.
Crashed runs' partial results are read as tools.view reads them. The file is written
whole or not at all. Exit status: 0 written, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from testbed.results.read import RunsError, add_runs_argument
from testbed.webview.page import render

from .view import load_feed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.report",
        description="Write one self-contained HTML file showing runs (no server, no network needed).")
    add_runs_argument(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="HTML file to write")
    p.add_argument("--title", help="the page's title (default: the scenario's name)")
    return p.parse_args(argv)


def write_report(paths: list[str], output: Path, title: str | None = None) -> int:
    """Write the report; the number of runs in it. RunsError on bad input."""
    feed = load_feed(paths, "report")
    scen = feed.runs[0].meta.get("scenario") if feed.runs else None
    name = title or (scen.get("name") if isinstance(scen, dict) else None) or "runs"
    html = render(feed.snapshot(), title=f"{name}: testbed report")
    tmp = output.with_name(output.name + ".tmp")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, output)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunsError(f"{output}: cannot write ({e.strerror or e})") from None
    return len(feed.runs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        n = write_report(args.runs, args.output, args.title)
    except RunsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{n} run(s) -> {args.output} ({args.output.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
