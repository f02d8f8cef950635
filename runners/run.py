"""`python -m runners.run SCENARIO.yaml [options]`: run a scenario, write result files.

Exit status: 0 every run completed, 1 a run failed (its meta.json says why), 2 bad input
(one line on stderr naming the file and key path; no run directory is created), 130
interrupted (Ctrl-C: one line; the run's files are flushed and say `failed: interrupted`,
its agent processes are stopped).

Bad input is refused before torch is imported (seconds of start-up on a busy host), so a
refusal takes about a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from testbed.emulation.clock import CLOCKS
from testbed.harness.control import TOKEN_ENV
from testbed.placement import ALGORITHM_NAMES
from testbed.placement.plugins import DECISION_TIMEOUT_S, Plugin, PluginRefused
from testbed.placement.registry import lookup, size_problem
from testbed.results.write import Tap
from testbed.scenario import Scenario, ScenarioError, check_host, load, parse_time_scale

if TYPE_CHECKING:  # imported when a run starts: torch takes seconds to import
    from testbed.experiments import run as experiment

DEFAULT_OUT = Path("results")
LIVE_PORT = 8765
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a process ended by Ctrl-C


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m runners.run",
        description="Run an edge-partitioning scenario on the emulated cluster and write its results.")
    p.add_argument("scenario", help="scenario YAML file (see scenarios/)")
    p.add_argument("--algorithm", help="placement algorithm(s), comma-separated: built-in "
                   f"({', '.join(ALGORITHM_NAMES)}), your own as path/to/file.py:ClassName or "
                   "package.module:ClassName, or an installed plug-in's name (docs/plugins.md); "
                   "default: the scenario's")
    p.add_argument("--decision-timeout", type=float, metavar="SECONDS",
                   help="a plug-in's place() (or constructor) not done within this many seconds fails "
                        "that algorithm's run, and the command goes on (default: the plug-in's own "
                        f"decision_timeout_s, else {DECISION_TIMEOUT_S:g})")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default: results/)")
    p.add_argument("--model-gguf", metavar="PATH",
                   help="run this GGUF model (llama or qwen2 architecture) instead of the scenario's model")
    p.add_argument("--seed", type=int, help="override the scenario's seed")
    p.add_argument("--tokens", type=int, help="override generation.new_tokens (short runs)")
    p.add_argument("--clock", choices=CLOCKS, default="real",
                   help="real (default) or virtual: fast, deterministic emulated time")
    p.add_argument("--time-scale", metavar="K|auto",
                   help="real clock: emulated time runs K times slower than the wall clock, so the "
                        "host's own work fits in the emulated windows; auto (default, or the "
                        "scenario's emulation.time_scale) calibrates K on this host; 1 is wall-clock speed, "
                        "below 1 faster (0 < K)")
    p.add_argument("--fixed-time-scale", action="store_true",
                   help="real clock: keep the time scale for the whole run (by default it rises when "
                        "the host falls behind; docs/fidelity.md)")
    p.add_argument("--transport", choices=("inproc", "ws"),
                   help="inproc (default): asyncio queues; ws: a websocket per agent pair on loopback")
    p.add_argument("--processes", action="store_true",
                   help="one OS process per device agent (implies --transport ws)")
    p.add_argument("--attach", action="append", default=[], metavar="NAME=URL",
                   help="use an agent started by hand (e.g. on another host) at URL for device NAME "
                        f"(implies --processes; the run token comes from {TOKEN_ENV})")
    p.add_argument("--links", choices=("emulated", "kernel"), default="emulated",
                   help="with --processes: kernel runs each agent in a network namespace of its own, its "
                        "links veth pairs shaped by the kernel's tbf (needs root and ip/tc; "
                        "docs/architecture.md, links through the kernel)")
    p.add_argument("--live", nargs="?", type=int, const=LIVE_PORT, metavar="PORT",
                   help=f"serve a live view of the run in the browser on PORT (default {LIVE_PORT}; 0: "
                        "any free port) and print its URL (docs/live.md)")
    p.add_argument("--live-host", metavar="HOST",
                   help="address of the live view (default 127.0.0.1); on any other address the page "
                        f"requires the run's token ({TOKEN_ENV}, else a random one, in the printed URL)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no summary, only the run directories (the time scale line goes to stderr)")
    return p.parse_args(argv)


def name_of(algorithm: str | Plugin) -> str:
    return algorithm if isinstance(algorithm, str) else algorithm.name


def resolve(args: argparse.Namespace) -> tuple[Scenario, list[str | Plugin]]:
    """Scenario with overrides, and the algorithms to run (built-in names, loaded plug-ins);
    ScenarioError on bad input."""
    scen = load(args.scenario, model_gguf=args.model_gguf)
    scen = scen.with_overrides(seed=args.seed, new_tokens=args.tokens)
    check_host(scen, psutil.virtual_memory().available, "--model-gguf" if args.model_gguf else "model")
    names = [a.strip() for a in args.algorithm.split(",")] if args.algorithm else [scen.controller.algorithm]
    if len(set(names)) != len(names):
        raise ScenarioError(scen.file, "--algorithm", "an algorithm is listed twice")
    algorithms: list[str | Plugin] = []
    limit = args.decision_timeout
    if limit is not None and not (math.isfinite(limit) and limit > 0):
        raise ScenarioError(scen.file, "--decision-timeout", f"must be a positive number of seconds, not {limit:g}")
    for name in names:
        try:
            found = lookup(name)
        except PluginRefused as e:
            raise ScenarioError(scen.file, "--algorithm", str(e)) from None
        if isinstance(found, Plugin) and limit is not None:
            found = dataclasses.replace(found, decision_timeout_s=limit)
        algorithms.append(found)
    shown = [name_of(a) for a in algorithms]
    twice = sorted({n for n in shown if shown.count(n) > 1})
    if twice:
        raise ScenarioError(scen.file, "--algorithm", f"two algorithms are named {twice[0]!r}")
    devices = len(scen.devices) + len(scen.joins())
    for name in names:
        why = size_problem(name, scen.model.layers, devices)
        if why:
            raise ScenarioError(scen.file, "--algorithm", why)
    attach = {}
    for item in args.attach:
        name, sep, url = item.partition("=")
        if not sep or name not in scen.device_names or not url.startswith(("http://", "https://")):
            raise ScenarioError(scen.file, "--attach", f"expected NAME=http://HOST:PORT with a device of the "
                                f"scenario, got {item!r}")
        attach[name] = url
    if attach:
        if len(os.environ.get(TOKEN_ENV, "")) < 16:
            raise ScenarioError(scen.file, "--attach", f"set {TOKEN_ENV} to the token the agents were started with")
        args.processes = True
    args.attach = attach
    if args.processes and args.transport == "inproc":
        raise ScenarioError(scen.file, "--processes", "agents in separate processes talk over --transport ws")
    args.transport = args.transport or ("ws" if args.processes else "inproc")
    if args.links == "kernel":
        if not args.processes or attach:
            raise ScenarioError(scen.file, "--links", "kernel links run agent processes started by the runner: "
                                "add --processes (and no --attach)")
        from testbed.harness.kernel import refusal

        why = refusal()
        if why:
            raise ScenarioError(scen.file, "--links", why)
    if args.time_scale is not None and args.clock == "virtual":
        raise ScenarioError(scen.file, "--time-scale", "applies to the real clock only (the virtual clock "
                            "does not run at any wall-clock speed)")
    if args.time_scale is not None:
        args.time_scale = parse_time_scale(args.time_scale, scen.file, "--time-scale")
        args.time_scale_from = "--time-scale"
    else:
        args.time_scale = scen.emulation.time_scale
        args.time_scale_from = "emulation.time_scale"
    if args.live_host is not None and args.live is None:
        raise ScenarioError(scen.file, "--live-host", "applies with --live only")
    if args.live is not None and not 0 <= args.live <= 65535:
        raise ScenarioError(scen.file, "--live", f"port must be from 0 to 65535, got {args.live}")
    if args.transport == "ws" and args.clock == "virtual":
        raise ScenarioError(scen.file, "--transport", "--clock virtual runs on the in-process transport only "
                            "(real sockets live in real time)")
    return scen, algorithms


def main(argv: list[str] | None = None) -> int:
    wall0 = time.perf_counter()
    args = parse_args(argv)
    # no emoji: `file.py:X: ...` must not become a picture
    err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
    out = Console(highlight=False, emoji=False)
    if not out.is_terminal:  # logs and pipes: wide enough for the comparison table
        out = Console(highlight=False, width=140, emoji=False)
    try:
        scen, algorithms = resolve(args)
    except ScenarioError as e:
        err.print(f"error: {e}", markup=False)
        return 2
    live = None
    if args.live is not None:
        live = Live(args.live_host or "127.0.0.1", args.live)
        try:
            url = live.start()
        except OSError as e:
            err.print(f"error: {scen.file}: --live: cannot listen on {live.server.host}:{args.live} "
                      f"({e.strerror or e})", markup=False)
            return 2
        (err if args.quiet else out).print(f"live view: {url}", markup=False, soft_wrap=True)
        sys.stdout.flush()  # a pipe buffers it: whoever opens the page needs the URL now
    outcomes: list[experiment.Outcome] = []
    try:
        return _main(args, scen, algorithms, out, err, live, wall0, outcomes)
    except KeyboardInterrupt:
        # the run in progress has written its files (status `failed: interrupted`) and
        # stopped its agents before the interrupt reached us
        where = f": results in {outcomes[-1].run_dir}" if outcomes else ""
        err.print(f"interrupted{where}", markup=False, soft_wrap=True)
        return EXIT_INTERRUPTED
    finally:
        if live is not None:
            live.close()


class Live:
    """The live view (testbed/webview): a server thread reading the rows each run writes."""

    def __init__(self, host: str, port: int) -> None:
        from testbed.webview.server import LOOPBACK, ViewServer
        from testbed.webview.state import Feed

        self.feed = Feed("live")
        # the run's token: the agents' (TOKEN_ENV) if given; off loopback without
        # one, a new one, which the agents this run starts then read from the environment
        token = os.environ.get(TOKEN_ENV) or None
        if token is None and host not in LOOPBACK:
            token = os.environ[TOKEN_ENV] = secrets.token_urlsafe(24)
        self.server = ViewServer(self.feed, host, port, token=token)

    def start(self) -> str:
        return self.server.start()

    def note(self, text: str) -> None:
        self.feed.note = text

    def tap(self, run_dir: Path, label: str) -> Tap:
        from testbed.webview.state import RunRecord

        self.feed.note = ""
        return self.feed.add(RunRecord(run_dir.name, str(run_dir), label)).record

    def close(self) -> None:
        self.feed.finished = True
        self.server.stop()


def _main(args: argparse.Namespace, scen: Scenario, algorithms: list[str | Plugin], out: Console,
          err: Console, live: Live | None, wall0: float, outcomes: list[experiment.Outcome]) -> int:
    from testbed.experiments import run as experiment
    from testbed.model.smollm2 import ModelUnavailable

    note = live.note if live is not None else (lambda text: None)
    note("computing the reference")
    if not args.quiet:
        out.print(f"[bold]{scen.name}[/]: {scen.model.name}, {len(scen.devices)} devices, "
                  f"{scen.generation.new_tokens} tokens, seed {scen.seed}, {args.clock} clock; "
                  f"computing the reference...")
    try:
        prep = experiment.prepare(scen)
    except ModelUnavailable as e:
        where = "--model-gguf" if args.model_gguf else "model"
        err.print(f"error: {scen.file}: {where}: {e}", markup=False)
        return 2
    k, calibration = 1.0, None
    if args.clock == "real":
        if args.time_scale is None:
            from testbed.experiments.timescale import calibrate

            note("calibrating the time scale")
            try:
                cal = calibrate(prep, algorithms, args.transport, args.processes, early=args.links != "kernel")
            except RuntimeError as e:
                err.print(f"error: {scen.file}: time scale calibration failed: {e} "
                          "(give --time-scale K to skip it)", markup=False)
                return 1
            k, calibration = cal.time_scale, cal.to_dict()
            (err if args.quiet else out).print(cal.line(), markup=False, soft_wrap=True)
        else:
            k, calibration = args.time_scale, {"time_scale": args.time_scale, "given": args.time_scale_from}
            if not args.quiet:
                out.print(f"time scale {k:g} ({args.time_scale_from}): emulated time runs {k:g} times slower "
                          "than the wall clock", markup=False)
    for alg in algorithms:
        run_dir = experiment.run_dir_for(args.out, scen, name_of(alg), scen.seed)
        show = out.is_terminal and not args.quiet
        try:
            with _progress(out, show, name_of(alg), scen.generation.new_tokens) as progress:
                outcome = experiment.run(prep, alg, run_dir, clock=args.clock, transport=args.transport,
                                         processes=args.processes, attach=args.attach, progress=progress,
                                         links=args.links, adapt=not args.fixed_time_scale,
                                         time_scale=k, calibration=calibration,
                                         tap=live.tap(run_dir, name_of(alg)) if live is not None else None)
        except experiment.Interrupted as e:
            outcomes.append(e.outcome)
            raise KeyboardInterrupt from None
        except experiment.RunDirError as e:
            err.print(f"error: --out: {e}", markup=False)
            return 2
        outcomes.append(outcome)
        fid = outcome.summary.get("fidelity", {})
        if args.quiet:
            out.print(f"{outcome.status} {outcome.run_dir}", markup=False, soft_wrap=True)
            if fid.get("distorted"):
                err.print(f"warning: {outcome.run_dir}: results distorted: {fid['reason']}", markup=False)
        else:
            print_summary(out, scen, args.clock, outcome)
    if len(outcomes) > 1 and not args.quiet:
        print_comparison(out, scen, outcomes)
    if not args.quiet:
        out.print(f"done in {time.perf_counter() - wall0:.0f} s of wall time (reference, "
                  f"{'time scale calibration, ' if calibration and not calibration.get('given') else ''}"
                  f"{len(outcomes)} run{'s' if len(outcomes) > 1 else ''})")
    return 0 if all(o.ok for o in outcomes) else 1


class _progress:
    """A rich progress bar on a terminal; nothing otherwise."""

    def __init__(self, console: Console, show: bool, alg: str, total: int) -> None:
        self.show, self.total = show, total
        self.bar = Progress(TextColumn(f"[bold]{escape(alg)}[/]"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("tokens"), TimeElapsedColumn(), console=console, transient=True)

    def __enter__(self) -> Any:
        if not self.show:
            return None
        self.bar.start()
        task = self.bar.add_task("run", total=self.total)
        return lambda k: self.bar.update(task, completed=k + 1)

    def __exit__(self, *exc: object) -> None:
        if self.show:
            self.bar.stop()


def _ms(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f} ms"


def print_summary(out: Console, scen: Scenario, clock: str, o: experiment.Outcome) -> None:
    s = o.summary
    lat, pred, corr = s["latency_ms"], s["predicted_ms"], s["correctness"]
    ok = "[green]completed[/]" if o.ok else f"[red]{escape(o.status)}[/]"
    out.print(f"\n[bold]{scen.name}[/] · [bold]{escape(o.algorithm)}[/] · seed {scen.seed} · {clock} clock: {ok}")
    out.print(f"  tokens        {s['tokens']} (prefill {_ms(s['prefill_ms'])})")
    out.print(f"  latency       mean {_ms(lat['mean'])}  p50 {_ms(lat['p50'])}  p95 {_ms(lat['p95'])}  "
              f"max {_ms(lat['max'])}   predicted p50 {_ms(pred['p50'])}")
    if len(s["windows"]) > 1:
        parts = [f"tokens {w['from_token']}-{w['to_token']}: mean {_ms(w['mean'])}" for w in s["windows"]]
        out.print("  by event      " + " | ".join(parts))
    out.print(f"  migrations    {s['migrations']} ({s['migrated_bytes'] / 2**20:.2f} MiB), "
              f"stall {s['stall_ms']:.2f} ms, replans {s['replans']}, oom {s['oom']}")
    if corr["tokens_match"]:
        out.print(f"  correctness   [green]tokens equal the reference[/] "
                  f"(max |logit diff| {corr['max_abs_logit_diff']:.1e})")
    else:
        out.print(f"  correctness   [red]{corr['mismatches']} token(s) differ from the reference[/] "
                  f"({corr['tokens_compared']} compared, max |logit diff| {corr['max_abs_logit_diff']})")
    if "generated_text" in s:
        out.print(f"  text          {s['prompt_text']!r} -> {s['generated_text']!r}", markup=False)
    if clock == "real":
        out.print(f"  time          {s['emulated_s']:.3f} s emulated in {s['wall_s']:.1f} s of wall time "
                  f"(time scale {' -> '.join(f'{k:g}' for _, k in s.get('time_scales') or [[0, s['time_scale']]])}); overruns: {s['overrun_fraction']:.1%} of jobs, "
                  f"{s.get('missed_reports', 0)} report(s) missed a decision, "
                  f"{s.get('late_decisions', 0)} re-plan(s) later than their modelled cost")
        fid = s["fidelity"]
        if fid["distorted"]:
            out.print(f"  [red]distorted[/]     {fid['reason']}", soft_wrap=True)
    else:
        out.print(f"  time          {s['emulated_s']:.3f} s emulated in {s['wall_s']:.1f} s of wall time")
    out.print(f"  run directory {o.run_dir}", markup=False, soft_wrap=True)


def print_comparison(out: Console, scen: Scenario, outcomes: list[experiment.Outcome]) -> None:
    cuts = sorted({e.at_token for e in scen.events if e.at_token is not None})
    t = Table(title=f"{scen.name}: per-token latency by algorithm (seed {scen.seed})")
    t.add_column("algorithm")
    t.add_column("status")
    t.add_column("mean", justify="right")
    t.add_column("p50", justify="right")
    t.add_column("p95", justify="right")
    if cuts:
        t.add_column(f"mean after token {cuts[0]}", justify="right")
    for col in ("migrations", "stall", "oom", "tokens ok"):
        t.add_column(col, justify="right")
    for o in outcomes:
        s = o.summary
        row = [escape(o.algorithm), "completed" if o.ok else escape(o.status[:40]), _ms(s["latency_ms"]["mean"]),
               _ms(s["latency_ms"]["p50"]), _ms(s["latency_ms"]["p95"])]
        if cuts:
            after = [w for w in s["windows"] if w["from_token"] >= cuts[0]]
            n = sum(w["tokens"] for w in after)
            row.append(_ms(sum(w["mean"] * w["tokens"] for w in after) / n) if n else "-")
        row += [str(s["migrations"]), f"{s['stall_ms']:.1f} ms", str(s["oom"]),
                "yes" if s["correctness"]["tokens_match"] else "no"]
        t.add_row(*row)
    out.print(t)


if __name__ == "__main__":
    sys.exit(main())
