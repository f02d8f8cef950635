"""The live page for finished, failed or crashed runs, served from their result files.

`python -m tools.view RUN_DIR_OR_PARENT... [--port N] [--host H]`

Every run directory at or beneath the paths is read (a crashed run's partial CSV files
too: a row cut short is dropped) and shown on one page, the runs overlaid on the latency
chart (labelled by algorithm, and by seed or scenario where those differ), one card each
with its placement, memory, links and events, and a token slider that replays them. It
serves until Ctrl-C on 127.0.0.1 (another --host requires the printed token). `load_feed`
is shared with tools/report.py. Exit status: 0 stopped by Ctrl-C, 2 bad input (one line
on stderr: a path that does not exist or holds no run, a port that cannot be had).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Iterable

from testbed.results.read import RunsError, add_runs_argument, labels, load_runs, read_csv
from testbed.webview.server import ViewServer
from testbed.webview.state import TABLES, Feed, RunRecord


def load_feed(paths: Iterable[str | os.PathLike], mode: str) -> Feed:
    """The runs at or beneath `paths`, read from their files (RunsError: none there)."""
    runs = load_runs(paths)
    names = labels(runs)
    feed = Feed(mode)
    ids: set[str] = set()
    for r in runs:
        rid = r.path.name
        while rid in ids:  # the same directory name under two parents
            rid += "'"
        ids.add(rid)
        rec = RunRecord(rid, str(r.path), names[r.path])
        rec.record("meta.json", r.meta)
        if r.summary is not None:  # a crashed run has none: the page says so from meta.json
            rec.record("summary.json", r.summary)
        for table, (name, _) in TABLES.items():
            header, rows = read_csv(r.path / name)
            rec.load(table, header, rows)
        feed.add(rec)
    feed.finished = True
    return feed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.view",
        description="Serve the live view's page for finished or crashed runs, overlaid, with a token slider.")
    add_runs_argument(p)
    p.add_argument("--port", type=int, default=0, help="port (default: any free one; the URL is printed)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address (default 127.0.0.1; any other requires the token in the printed URL)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not 0 <= args.port <= 65535:
            raise RunsError(f"--port: must be from 0 to 65535, not {args.port}")
        feed = load_feed(args.runs, "view")
        server = ViewServer(feed, args.host, args.port)
        try:
            url = server.start()
        except OSError as e:
            raise RunsError(f"--port: cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None
    except RunsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(feed.runs)} run(s): {url}  (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(linger_s=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
