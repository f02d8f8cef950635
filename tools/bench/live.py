"""Does watching slow a run down? Wall time of runs with and without `--live` and a page.

`python -m tools.bench.live [--scenario FILE] [--clocks virtual,real] [--repeats N]
[--tokens N] [--time-scale K] [--client browser|stream] [--json PATH]`

For each clock, `--repeats` pairs of runs of the scenario (`python -m runners.run ...
--quiet`, alternating which of the pair goes first): one plain, one with `--live 0` and a
client connected for the whole run: the page in headless Chromium (`browser`, the
default: what a user watching on the same machine costs, rendering included; the browser
is open during the plain runs too, on a blank page) or a bare reader of the pushed stream
(`stream`). The figure compared is the run's own wall time (summary.json `wall_s`: from
the cluster's start to the summary, without the torch import and the reference), as a
median over the repeats; the process's wall time and, on the real clock, the share of
jobs that overran their emulated windows are printed beside it. Target: with the live
view within 5 % of without. The real clock uses a fixed --time-scale (calibration would
choose a different one for every run). Figures are as measured on this machine (2 cores,
shared with other work), never assumed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from testbed.webview.server import dumps
from testbed.webview.state import TABLES, Cursor, Feed, RunRecord

from ..browser import BrowserUnavailable, browser
from ..view import load_feed

ROOT = Path(__file__).resolve().parents[2]
TARGET = 0.05


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench.live",
                                description="Wall time of runs with and without the live view and a connected page.")
    p.add_argument("--scenario", default="scenarios/bandwidth_drop.yaml")
    p.add_argument("--clocks", default="virtual,real", help="comma-separated: virtual, real")
    p.add_argument("--repeats", type=int, default=5, help="pairs of runs per clock (default 5)")
    p.add_argument("--tokens", type=int, help="override generation.new_tokens")
    p.add_argument("--time-scale", type=float, default=10.0, help="real clock's time scale (default 10)")
    p.add_argument("--client", choices=("browser", "stream"), default="browser")
    p.add_argument("--json", type=Path, help="also write every run's figures here")
    p.add_argument("--summarize", type=Path, metavar="JSON",
                   help="only print the comparison of the runs in a --json file written before")
    return p.parse_args(argv)


class StreamReader(threading.Thread):
    """Reads the pushed stream to its end, as a page would (without drawing)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.bytes = url, 0

    def run(self) -> None:
        base, _, query = self.url.partition("?")
        try:
            with urllib.request.urlopen(base + "api/stream" + (f"?{query}" if query else ""), timeout=600) as r:
                while chunk := r.read(4096):
                    self.bytes += len(chunk)
        except OSError:
            pass


def browser_cpu(driver: Any) -> float:
    """CPU seconds of the browser's processes so far (the driver's children)."""
    if driver is None:
        return 0.0
    try:
        procs = psutil.Process(driver.service.process.pid).children(recursive=True)
    except (psutil.Error, AttributeError):
        return 0.0
    total = 0.0
    for pr in procs:
        try:
            c = pr.cpu_times()
            total += c.user + c.system
        except psutil.Error:
            pass
    return total


def one_run(args: argparse.Namespace, clock: str, live: bool, out: Path, driver: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "runners.run", args.scenario, "--clock", clock, "--out", str(out), "--quiet"]
    if clock == "real":
        cmd += ["--time-scale", f"{args.time_scale:g}"]
    if args.tokens:
        cmd += ["--tokens", str(args.tokens)]
    if live:
        cmd += ["--live", "0"]
    cpu0 = browser_cpu(driver)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client: dict[str, Any] = {}
    reader = None
    if live:
        assert p.stderr is not None  # started with stderr=PIPE
        line = p.stderr.readline()
        m = re.search(r"live view: (http://\S+)", line)
        if not m:
            p.kill()
            raise RuntimeError(f"no live view URL from the runner: {line!r}")
        if driver is not None:
            driver.get(m.group(1))
        else:
            reader = StreamReader(m.group(1))
            reader.start()
    stdout, stderr = p.communicate(timeout=1800)
    wall = time.perf_counter() - t0
    if driver is not None:  # a blank page's cost too: the browser's own baseline
        client["browser_cpu_s"] = round(browser_cpu(driver) - cpu0, 3)
    if live and driver is not None:  # what the page had drawn when the run ended
        client["page_points"] = int(driver.execute_script(
            "const e = document.getElementById('latency'); return e ? +e.dataset.points || 0 : 0"))
        client["page_errors"] = len([e for e in driver.get_log("browser") if e.get("level") == "SEVERE"])
        driver.get("about:blank")
    if reader is not None:
        reader.join(10)
        client["stream_bytes"] = reader.bytes
    m = re.search(r"^(\S+) (\S+)$", stdout.strip().splitlines()[-1] if stdout.strip() else "")
    if p.returncode != 0 or not m:
        raise RuntimeError(f"run failed ({p.returncode}): {stdout[-500:]} {stderr[-500:]}")
    summary = json.loads((Path(m.group(2)) / "summary.json").read_text())
    return {"clock": clock, "live": live, "run_wall_s": summary["wall_s"], "process_wall_s": round(wall, 3),
            "run_cpu_s": summary.get("host", {}).get("run_cpu_s"), "run_dir": m.group(2),
            "overrun_fraction": summary.get("overrun_fraction", 0.0), "tokens": summary["tokens"], **client}


def delta_cost(run_dir: Path) -> tuple[int, float, int]:
    """What the live server's thread does for one page, replayed on a finished run's rows:
    one update per token (its rows, the devices' telemetry and what else was written
    before the next token) plus one empty check, as `ViewServer` sends them. (updates, CPU
    milliseconds in all, bytes)."""
    src = load_feed([run_dir], "view").runs[0]
    feed = Feed("live")
    rec = feed.add(RunRecord("bench", str(run_dir), "bench"))
    rec.record("meta.json", src.meta)
    cursor = Cursor()
    feed.snapshot(cursor)
    by_token: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    for table, (name, _) in TABLES.items():
        for row in src.rows[table]:
            by_token.setdefault(int(row.get("token") or 0), []).append((name, dict(row)))
    t0, sent = time.thread_time(), 0
    for k in sorted(by_token):
        for name, row in by_token[k]:
            rec.record(name, row)
        sent += len(dumps(feed.delta(cursor)))
        feed.delta(cursor)
    return len(by_token), (time.thread_time() - t0) * 1e3, sent


def _span(rows: list[dict[str, Any]]) -> str:
    xs = [r["run_wall_s"] for r in rows]
    return f"{min(xs):.2f}-{max(xs):.2f} s"


def _median(rows: list[dict[str, Any]], key: str) -> float:
    xs = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(xs) if xs else float("nan")


def summarize(rows: list[dict[str, Any]], client: str) -> bool:
    """Print the comparison per clock; whether every clock met the target."""
    ok = True
    for clock in dict.fromkeys(r["clock"] for r in rows):
        plain = [r for r in rows if r["clock"] == clock and not r["live"]]
        live = [r for r in rows if r["clock"] == clock and r["live"]]
        a, b = _median(plain, "run_wall_s"), _median(live, "run_wall_s")
        diff = b / a - 1
        ok &= diff <= TARGET
        # the two runs of a pair ran back to back, so under the same other load: their ratio
        # is steadier than the ratio of the medians when the machine's load changes
        mine = [r for r in rows if r["clock"] == clock]
        ratios = [(y if y["live"] else x)["run_wall_s"] / (x if y["live"] else y)["run_wall_s"] - 1
                  for x, y in zip(mine[::2], mine[1::2], strict=False)]
        print(f"{clock} clock, medians of {len(plain)} pairs: run wall time without --live {a:.2f} s, with --live "
              f"and a connected {client} {b:.2f} s ({diff:+.1%}; target at most {TARGET:+.0%}: "
              f"{'met' if diff <= TARGET else 'NOT met'}; spread {_span(plain)} and {_span(live)}); median of "
              f"the pairs' differences {statistics.median(ratios):+.1%}; runner CPU "
              f"{_median(plain, 'run_cpu_s'):.2f} s and {_median(live, 'run_cpu_s'):.2f} s; overruns "
              f"{_median(plain, 'overrun_fraction'):.1%} and {_median(live, 'overrun_fraction'):.1%}"
              + (f"; browser CPU {_median(plain, 'browser_cpu_s'):.2f} s (blank page) and "
                 f"{_median(live, 'browser_cpu_s'):.2f} s (the live page)" if client == "browser" else ""))
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize:
        data = json.loads(args.summarize.read_text())
        return 0 if summarize(data["runs"], data["client"]) else 1
    clocks = [c.strip() for c in args.clocks.split(",") if c.strip()]
    if not clocks or any(c not in ("virtual", "real") for c in clocks) or args.repeats < 1:
        print("error: --clocks takes virtual and/or real; --repeats must be >= 1", file=sys.stderr)
        return 2
    driver = None
    if args.client == "browser":
        try:
            driver = browser(1400, 1000)
        except BrowserUnavailable as e:
            print(f"error: --client browser: {e} (or use --client stream)", file=sys.stderr)
            return 2
        driver.get("about:blank")
    rows: list[dict[str, Any]] = []
    print(f"{args.scenario}: {args.repeats} pairs of runs per clock, client: {args.client}", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
            for clock in clocks:
                for i in range(args.repeats):
                    for live in ((False, True) if i % 2 == 0 else (True, False)):
                        r = one_run(args, clock, live, Path(tmp), driver)
                        rows.append(r)
                        extra = (f", browser CPU {r['browser_cpu_s']:.2f} s" if "browser_cpu_s" in r else "")
                        extra += (f", page drew {r['page_points']} points, {r['page_errors']} console errors"
                                 if "page_points" in r else
                                 f", stream {r['stream_bytes']} bytes" if "stream_bytes" in r else "")
                        print(f"  {clock:7s} {'live' if live else 'plain':5s} run {r['run_wall_s']:7.2f} s, "
                              f"process {r['process_wall_s']:7.2f} s, runner CPU {r['run_cpu_s']:.2f} s, overruns {r['overrun_fraction']:.1%}{extra}",
                              flush=True)
            n, ms, size = delta_cost(Path(rows[-1]["run_dir"]))
            print(f"  the server's work for one page, replayed on the last run's rows: {n} updates, "
                  f"{ms:.1f} ms of CPU in all ({ms / n * 1e3:.0f} us each), {size / 1024:.0f} KiB", flush=True)
    finally:
        if driver is not None:
            driver.quit()
    print()
    ok = summarize(rows, args.client)
    if args.json:
        args.json.write_text(json.dumps({"client": args.client, "runs": rows}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
