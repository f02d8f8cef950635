"""Real-time fidelity: real-clock runs against their virtual-clock twins, links and lag.

`python -m tools.bench.realtime [--part scenarios,main,links,lag,host] [--scenarios A,B]
[--tokens N] [--doc FILE | --no-doc] [--seconds S] [--rates ...] [--agents 8,16,32] [--json PATH]`

- scenarios (the default part): every shipped scenario (first `--tokens` tokens), run on
  the virtual clock, then on the real clock as a user runs it (time scale `auto`,
  calibrated for each mode) in process and with one process per agent over websockets.
  Each real-clock run is compared with its virtual twin (`testbed.experiments.twin`): mean per-token
  latency within 5 %, p95 within 10 %, migrations and their stall within 10 %, at most 1 % of jobs
  overrunning, the reference's tokens; and the decisions alone (`twin.same_decisions`: the
  same re-plans, the same blocks moved at the same tokens, their stall within 2 %). The
  table, with the command that measured it, is written between the `<!-- bench_realtime:begin -->` and `<!-- bench_realtime:end -->`
  lines of docs/fidelity.md (`--doc FILE` for another file, `--readme FILE` its old name;
  `--no-doc` only prints it), replacing the table there: run every scenario.

- links: two agent processes; the sender keeps its emulated link to the other busy with
  probe frames (1 to 1000 Mbit/s, 5 ms latency). Throughput is measured at the receiver
  (bytes after the first frame over the time from the first arrival to the last); the
  added delay of each frame is its arrival at the receiver (its own process, same
  monotonic clock) minus the time the sender's link scheduled it to arrive. Bytes are
  whole frames as the link charges them (payload plus msgpack framing). Targets:
  throughput within 2 % of the configured rate, each delivery at most 2 ms late.
- main: the README's first command, `bandwidth_drop.yaml` as shipped, with `static` and
  `resource_aware` on the real clock (time scale auto, one scale for both) and on the
  virtual clock: migrations, and the ratio of `resource_aware`'s mean latency after the
  drop to `static`'s, real against virtual (target: migrations within 20 %, ratio within
  5 %).
- lag: event-loop lag (how late a 10 ms timer wakes) in every agent process and in the
  runner during a run at wall-clock speed (time scale 1) with 8, 16 and 32 agents.
- host: the host's own work, on the virtual clock (default scenario smollm2_bandwidth_drop,
  first `--tokens`): each block kind's forward at decode against one `F.linear` over its
  weight matrices stacked (the same multiply-adds and weight bytes as one torch call;
  target: at most 2x), and the distributed run's host time per decoded token against the
  monolithic reference's `Reference.forward` per token (target: at most 1.5x).
- links and lag run at wall-clock speed (time scale 1): they measure the host's timers and
  sockets themselves.
Figures are reported as measured on this machine; it has 2 cores and other work may run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from testbed.common.stats import percentile
from testbed.emulation.clock import LagMonitor
from testbed.emulation.clock import run as run_loop
from testbed.experiments import run as experiment
from testbed.experiments import timescale, twin
from testbed.experiments.worlds import twin_framing
from testbed.harness.remote import ProcessCluster
from testbed.model.blocks import TORCH_DTYPES, HeadBlock, ProjBlock, Reference, make_block
from testbed.results.read import Run
from testbed.scenario import Event, SetLink, load, parse
from tools.docs.markers import read_between, write_between

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "fidelity.md"  # where the scenarios table lives
SECTION = "bench_realtime"
RATES = (1.0, 10.0, 100.0, 1000.0)
SIZES = {1.0: 1500, 10.0: 4096, 100.0: 16384, 1000.0: 65536}
ALL = ",".join(sorted(p.stem for p in (ROOT / "scenarios").glob("*.yaml")))


def _cluster_dict(n: int, gflops: float = 1.0, mbps: float = 1000.0, latency_ms: float = 5.0) -> dict[str, Any]:
    names = ["a", "b"] if n == 2 else [f"d{i:02d}" for i in range(n)]
    return {"version": 1, "name": "bench", "seed": 0, "model": {"preset": "gpt-mini"},
            "generation": {"prompt_tokens": 8, "new_tokens": 24},
            "devices": [{"name": x, "compute_gflops": gflops, "memory_mib": 512} for x in names],
            "network": {"default": {"bandwidth_mbps": mbps, "latency_ms": latency_ms}},
            "controller": {"algorithm": "resource_aware", "interval_tokens": 8, "telemetry": "oracle"}}


# ---------------------------------------------------------------------------- scenarios

MODES = (("in process", "inproc", False), ("processes", "ws", True))


def _start_monitor(mon: LagMonitor, world: Any) -> None:
    mon.start()


def _scenarios(names: list[str], tokens: int, calibrate_only: frozenset[str] | set[str] = frozenset(),
               modes: tuple[tuple[str, str, bool], ...] = MODES,
               on_row: Callable[[list[dict[str, Any]]], None] = lambda rows: None) -> list[dict[str, Any]]:
    """Run each scenario on both clocks and compare, in each of `modes`; for those in
    `calibrate_only`, only calibrate (on the real clock, in process) and report the time
    scale and the wall time a run would take. `on_row` sees the rows so far after each one
    (a run of the SmolLM2 scenarios takes an hour: nothing measured is lost to a stop)."""
    out: list[dict[str, Any]] = []
    for name in names:
        scen = load(ROOT / "scenarios" / f"{name}.yaml")
        if tokens:
            scen = scen.with_overrides(new_tokens=min(tokens, scen.generation.new_tokens))
        try:
            prep = experiment.prepare(scen)
        except Exception as e:  # e.g. real weights not installed
            out.append({"scenario": name, "mode": "-", "skipped": f"{type(e).__name__}: {e}"})
            continue
        alg = scen.controller.algorithm
        if name in calibrate_only:
            for label, transport, processes in modes[:1]:
                cal = timescale.calibrate(prep, [alg], transport, processes)
                print(f"  {name}, {label}: {cal.line()}", flush=True)
                out.append({"scenario": name, "mode": label, "tokens": scen.generation.new_tokens,
                            "skipped": f"calibrated only: time scale {cal.time_scale:g}, about "
                                       f"{cal.expected_wall_s:.0f} s of wall time per run in process"})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            twins: dict[int, Any] = {}  # the virtual twin per framing charged (worlds.twin_framing)
            for label, transport, processes in modes:
                framing = twin_framing(transport, processes)
                if framing not in twins:
                    twins[framing] = experiment.run(prep, alg, Path(tmp) / f"virtual{framing}", clock="virtual",
                                                    framing=framing)
                virtual = twins[framing]
                cal = timescale.calibrate(prep, [alg], transport, processes)
                print(f"  {name}, {label}: {cal.line()}", flush=True)
                real = experiment.run(prep, alg, Path(tmp) / transport, clock="real", transport=transport,
                                      processes=processes, time_scale=cal.time_scale, calibration=cal.to_dict())
                c = twin.compare(real.summary, virtual.summary)
                d = twin.same_decisions(_decisions(real.run_dir), _decisions(virtual.run_dir))
                c = {**c, "same_decisions": d["same"], "decision_problems": d["problems"]}
                out.append({"scenario": name, "mode": label, "tokens": scen.generation.new_tokens,
                            "calibration_s": cal.seconds, "calibration": cal.to_dict(), **c,
                            "time_scales": real.summary.get("time_scales"),
                            "load_avg_1m": (real.summary.get("host") or {}).get("load_avg_1m")})
                print(f"  {name}, {label}: {'faithful' if c['faithful'] else '; '.join(c['problems'])}; "
                      f"{'the same decisions' if d['same'] else '; '.join(d['problems'])}", flush=True)
                on_row(out)
    return out


def _decisions(run_dir: Path) -> dict[str, Any]:
    """A run's decisions (`twin.decisions`) from its directory."""
    run = Run(run_dir)
    return twin.decisions(run.events, run.tokens)


def scenarios_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the scenarios part."""
    lines = ["| scenario | agents | tokens | K | wall s | mean ms (virtual) | mean | p95 ms (virtual) | p95 "
             "| migrations (virtual) | overruns | result |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['scenario']} | {r['mode']} | {r.get('tokens', '-')} | - | - | - | - | - | - | - | - "
                         f"| {r['skipped']} |")
            continue
        lines.append(
            f"| {r['scenario']} | {r['mode']} | {r['tokens']} | {_scales(r)} | {r['wall_s']:.0f} "
            f"| {r['mean_ms']:.2f} ({r['twin_mean_ms']:.2f}) | {r['mean_error']:+.1%} "
            f"| {r['p95_ms']:.2f} ({r['twin_p95_ms']:.2f}) | {r['p95_error']:+.1%} "
            f"| {r['migrations']} ({r['twin_migrations']}) | {r['overrun_fraction']:.1%} "
            f"| {'faithful' if r['faithful'] else '; '.join(r['problems'])}"
            f"{'' if r.get('same_decisions', True) else '; other decisions: ' + '; '.join(r['decision_problems'])} |")
    return "\n".join(lines)


def _scales(r: dict[str, Any]) -> str:
    """The row's time scale, and where it rose during the run (the host fell behind) what it
    rose to: 8 -> 16."""
    ks = [k for _, k in r.get("time_scales") or []] or [r["time_scale"]]
    return " -> ".join(f"{k:g}" for k in ks)


def _after(summary: dict[str, Any], token: int) -> float:
    """Mean per-token latency from `token` on (scenario windows after it, stalls included)."""
    ws = [w for w in summary["windows"] if w["from_token"] >= token]
    n = sum(w["tokens"] for w in ws)
    return sum(w["mean"] * w["tokens"] for w in ws) / n if n else float("nan")


def _main_job() -> dict[str, Any]:
    scen = load(ROOT / "scenarios" / "bandwidth_drop.yaml")
    cut = min(e.at_token for e in scen.events if e.at_token is not None)
    prep = experiment.prepare(scen)
    algs = ["static", "resource_aware"]
    cal = timescale.calibrate(prep, algs)
    print(f"  {cal.line()}", flush=True)
    res: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for clock in ("virtual", "real"):
            for a in algs:
                o = experiment.run(prep, a, Path(tmp) / f"{clock}-{a}", clock=clock, time_scale=cal.time_scale,
                                   calibration=cal.to_dict())
                res[f"{clock}/{a}"] = o.summary
    ratio = {c: _after(res[f"{c}/resource_aware"], cut) / _after(res[f"{c}/static"], cut) for c in ("virtual", "real")}
    mig = {c: res[f"{c}/resource_aware"]["migrations"] for c in ("virtual", "real")}
    ok = abs(mig["real"] - mig["virtual"]) <= 0.2 * mig["virtual"] and abs(ratio["real"] / ratio["virtual"] - 1) <= 0.05
    return {"time_scale": cal.time_scale, "cut": cut, "ratio": ratio, "migrations": mig,
            "after_ms": {k: _after(v, cut) for k, v in res.items()},
            "wall_s": {k: v["wall_s"] for k, v in res.items()},
            "overrun": {k: v["overrun_fraction"] for k, v in res.items() if k.startswith("real")},
            "time_scales": {k: v.get("time_scales") for k, v in res.items() if k.startswith("real")},
            "load_avg_1m": {k: (v.get("host") or {}).get("load_avg_1m") for k, v in res.items() if k.startswith("real")},
            "pass": ok}


# ---------------------------------------------------------------------------- host work

def _median_s(fn: Callable[[], Any], repeat: int) -> float:
    """Median wall seconds of one call of fn (after two warm-up calls)."""
    fn()
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _stacked(block: Any) -> torch.Tensor:
    """The block's weight matrices as one [rows, D] matrix: one `F.linear` over it does the
    same multiply-adds and reads the same weight bytes as the block's own products."""
    mats = [w if w.shape[-1] == block.spec.d_model else w.t() for w in block.w.values() if w.dim() == 2]
    return torch.cat(mats).contiguous()


def _forward_of(block: Any, x: torch.Tensor, pos: int) -> Callable[[], Any]:
    """One decode-time forward of `block` (a head with a cache of `pos` positions)."""
    s = block.spec
    if isinstance(block, HeadBlock):
        block.cache.write(0, torch.zeros(pos, s.d_head, dtype=x.dtype), torch.zeros(pos, s.d_head, dtype=x.dtype))
        return lambda: block.forward(x, pos)
    if isinstance(block, ProjBlock):
        outs = x.clone()
        return lambda: block.forward(outs, x)
    return lambda: block.forward(x)


def _block_jobs(prep: Any, pos: int, repeat: int) -> list[dict[str, Any]]:
    """Per block kind (layer 0): host microseconds of the block's forward at decode (one new
    position at `pos`) against one `F.linear` call with the same weight multiply-adds."""
    s = prep.model
    out = []
    x = torch.randn(1, s.d_model, generator=torch.Generator().manual_seed(0)).to(TORCH_DTYPES[s.dtype])
    for kind, name in (("head", "head.0.0"), ("proj", "proj.0"), ("ffn", "ffn.0")):
        block = make_block(s, name, prep.weights.block(name))
        w = _stacked(block)
        with torch.inference_mode():
            block_s = _median_s(_forward_of(block, x, pos), repeat)
            one_s = _median_s(functools.partial(F.linear, x, w), repeat)
        out.append({"kind": kind, "block_us": 1e6 * block_s, "one_call_us": 1e6 * one_s,
                    "ratio": block_s / one_s, "weights": int(w.numel())})
    return out


def _host(name: str, tokens: int, algorithm: str | None, repeat: int) -> dict[str, Any]:
    """Host work of `name` (its first `tokens` tokens): per block job against one torch call,
    and the distributed virtual run's host time per decoded token against the monolithic
    reference's (the same blocks in one process, `Reference.forward` per token)."""
    scen = load(ROOT / "scenarios" / f"{name}.yaml")
    if tokens:
        scen = scen.with_overrides(new_tokens=min(tokens, scen.generation.new_tokens))
    prep = experiment.prepare(scen)
    n = scen.generation.new_tokens
    jobs = _block_jobs(prep, len(prep.prompt) + n // 2, repeat)
    ref = Reference(prep.weights)
    ref_s: list[float] = []
    with torch.inference_mode():
        ref.forward(list(prep.prompt))
        for tok in prep.ref_ids[:-1]:
            t0 = time.perf_counter()
            ref.forward([tok])
            ref_s.append(time.perf_counter() - t0)
    alg = algorithm or scen.controller.algorithm
    marks: list[float] = []
    traces: list[list[tuple[float, float, float]]] = []

    def setup(world: Any) -> None:
        for agent in world.agents.values():
            agent.compute.trace = []
            traces.append(agent.compute.trace)

    with tempfile.TemporaryDirectory() as tmp:
        o = experiment.run(prep, alg, Path(tmp) / "virtual", clock="virtual", setup=setup,
                           progress=lambda k: marks.append(time.perf_counter()))
    per_token = [b - a for a, b in zip(marks, marks[1:], strict=False)]  # tokens 1..n-1: decode
    njobs = sum(len(t) for t in traces)
    ref_mean = statistics.fmean(ref_s) if ref_s else math.nan
    run_mean = statistics.fmean(per_token) if per_token else math.nan
    return {"scenario": name, "algorithm": alg, "tokens": n, "status": o.status, "blocks": jobs,
            "reference_decode_ms": 1e3 * ref_mean, "reference_decode_median_ms": 1e3 * statistics.median(ref_s),
            "run_decode_ms": 1e3 * run_mean, "run_decode_median_ms": 1e3 * statistics.median(per_token),
            "run_ratio": run_mean / ref_mean, "run_median_ratio": statistics.median(per_token) / statistics.median(ref_s),
            "jobs": njobs, "torch_us_per_job": 1e6 * statistics.fmean(w for t in traces for _, _, w in t),
            "host_us_per_job": 1e6 * o.summary["wall_s"] / njobs}


def host_report(r: dict[str, Any]) -> str:
    lines = [f"host work, {r['scenario']} ({r['tokens']} tokens, {r['algorithm']}; {r['status']})",
             f"{'block':>6} {'forward us':>11} {'one call us':>12} {'ratio':>6}"]
    for b in r["blocks"]:
        lines.append(f"{b['kind']:>6} {b['block_us']:11.1f} {b['one_call_us']:12.1f} {b['ratio']:6.2f}")
    lines.append(f"virtual run: {r['jobs']} jobs, torch {r['torch_us_per_job']:.1f} us per job, all host work "
                 f"{r['host_us_per_job']:.1f} us per job")
    lines.append(f"per decoded token: run {r['run_decode_ms']:.1f} ms (median {r['run_decode_median_ms']:.1f}), "
                 f"reference {r['reference_decode_ms']:.1f} ms (median {r['reference_decode_median_ms']:.1f}): "
                 f"{r['run_ratio']:.2f}x (medians {r['run_median_ratio']:.2f}x)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- links

async def _links(rates: list[float], seconds: float) -> list[dict[str, Any]]:
    scen = parse(_cluster_dict(2), "<bench>")
    cluster = ProcessCluster(scen, scen.model, on_fault=lambda w, m: print(f"fault: {w}: {m}", file=sys.stderr))
    await cluster.start()
    out = []
    try:
        for rate in rates:
            await cluster.apply(Event(0, SetLink(("a", "b"), bandwidth_mbps=rate, latency_ms=5.0), at_token=0))
            size = SIZES.get(rate, 16384)
            count = int(rate * 1e6 / 8 * seconds / size) + 2
            await cluster.ask("b", "probe_log", on=True)
            sent = (await cluster.ask("a", "bulk", peer="b", size=size, count=count, seconds=seconds,
                                      timeout=seconds + 60))["transfers"]
            await asyncio.sleep(0.05)
            got = (await cluster.ask("b", "probe_log", on=False))["arrivals"]
            arrival = {n: t for _, n, _, t in got}
            late = [arrival[i] - sched for i, _, sched, _ in sent if i in arrival]
            times = sorted(arrival.values())
            frame = {i: sz for i, sz, _, _ in sent}  # bytes the link carried (the whole frame)
            first = min(arrival, key=lambda i: arrival[i]) if arrival else None
            nbytes = sum(frame[i] for i in arrival if i != first)
            measured = nbytes * 8 / (times[-1] - times[0]) / 1e6 if len(times) > 1 else float("nan")
            err = 100 * (measured - rate) / rate
            out.append({"mbps": rate, "frame_bytes": size, "frames": len(sent), "received": len(got),
                        "measured_mbps": measured, "error_pct": err,
                        "late_mean_ms": 1e3 * statistics.fmean(late), "late_p99_ms": 1e3 * percentile(late, 99),
                        "late_max_ms": 1e3 * max(late), "early": sum(x < -1e-4 for x in late),
                        "pass": abs(err) <= 2 and max(late) <= 2e-3 and len(got) == len(sent)})
    finally:
        await cluster.stop()
    return out


# ---------------------------------------------------------------------------- lag

def _lag(agents: list[int], tokens: int) -> list[dict[str, Any]]:
    out = []
    for n in agents:
        d = _cluster_dict(n, gflops=0.5, mbps=1000, latency_ms=0.1)
        d["generation"]["new_tokens"] = tokens
        prep = experiment.prepare(parse(d, f"<{n} agents>"))
        mon = LagMonitor()
        lags: dict[str, Any] = {}

        async def finish(world: Any, ctl: Any, lags: dict[str, Any] = lags, mon: LagMonitor = mon) -> None:
            lags.update(await world.lags())
            mon.stop()

        with tempfile.TemporaryDirectory() as tmp:
            o = experiment.run(prep, "resource_aware", Path(tmp) / "run", clock="real", transport="ws",
                               processes=True, setup=functools.partial(_start_monitor, mon), on_finish=finish)
        runner = mon.stats()
        out.append({"agents": n, "status": o.status,
                    "agent_lag_mean_ms": statistics.fmean(v["mean_ms"] for v in lags.values()) if lags else None,
                    "agent_lag_p99_ms": max((v["p99_ms"] for v in lags.values()), default=None),
                    "agent_lag_max_ms": max((v["max_ms"] for v in lags.values()), default=None),
                    "runner_lag_mean_ms": runner["mean_ms"], "runner_lag_p99_ms": runner["p99_ms"],
                    "runner_lag_max_ms": runner["max_ms"],
                    "latency_mean_ms": o.summary["latency_ms"]["mean"]})
    return out


def _machine() -> str:
    import os
    import platform

    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def _tabulate(files: list[Path], doc: Path | None, section: str, cmd: str) -> int:
    """One table from the rows of earlier `--json` files (runs too long for one sitting, e.g.
    each SmolLM2 scenario and mode on its own), each file's command and revision named."""
    rows, sources = [], []
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
            rows += data["scenarios"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: {f}: not a --json file of the scenarios part ({e})", file=sys.stderr)
            return 2
        sources.append(f"`{data.get('command', 'command not recorded')}` (revision "
                       f"`{data.get('revision', '?')}`, {data.get('machine', 'machine not recorded')}; "
                       f"rows in `{f.as_posix()}`)")
    table = scenarios_table(rows)
    print(table)
    if doc is not None:
        write_between(doc, section, "Measured by " + "; ".join(sources) + f", tabulated by `{cmd}`:\n\n{table}")
    return 0 if all(r.get("faithful", True) for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench.realtime", description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="scenarios", help="comma-separated: scenarios, main, links, lag, host")
    ap.add_argument("--scenarios", default=ALL,
                    help="scenario names (scenarios/NAME.yaml) for the scenarios part (default: all) and the "
                         "host part (default: smollm2_bandwidth_drop)")
    ap.add_argument("--algorithm", help="host part: the algorithm of the virtual run (default: the scenario's)")
    ap.add_argument("--repeat", type=int, default=200, help="host part: timed calls per block")
    ap.add_argument("--calibrate-only", default="",
                    help="scenario names to calibrate but not run (their real-clock runs take too long)")
    ap.add_argument("--doc", "--readme", dest="doc", type=Path, default=DOC,
                    help="write the scenarios table into this file's bench_realtime section "
                         "(default: docs/fidelity.md; --readme is its old name)")
    ap.add_argument("--no-doc", action="store_true", help="print the scenarios table, write it nowhere")
    ap.add_argument("--section", default=SECTION,
                    help=f"the marker section to write the table into (default {SECTION}; e.g. one per "
                         "set of scenarios measured with its own --tokens)")
    ap.add_argument("--modes", default=",".join(m[1] for m in MODES),
                    help="inproc, ws (one process per agent over websockets), or both (default)")
    ap.add_argument("--seconds", type=float, default=1.5, help="bulk traffic per rate (links)")
    ap.add_argument("--rates", default=",".join(f"{r:g}" for r in RATES), help="Mbit/s (links)")
    ap.add_argument("--tokens", type=int, default=48,
                    help="tokens per run (scenarios: at most this many, 0 for the scenario's own; lag)")
    ap.add_argument("--agents", default="8,16,32", help="agent counts (lag)")
    ap.add_argument("--json", help="also write every figure to this file (the scenarios' rows after each run)")
    ap.add_argument("--from-json", default="",
                    help="comma-separated files written by --json: write their scenarios rows as one table "
                         "(with the command that measured each) instead of running anything")
    args = ap.parse_args(argv)
    cmd = " ".join(["python -m tools.bench.realtime", *(argv if argv is not None else sys.argv[1:])])
    parts = set(args.part.split(","))
    if "scenarios" in parts and not args.no_doc:  # before an hour of runs, not after
        text = args.doc.read_text(encoding="utf-8") if args.doc.is_file() else ""
        if read_between(text, args.section) is None:
            print(f"error: {args.doc}: no <!-- {args.section}:begin --> ... <!-- {args.section}:end --> section "
                  "to write the table into (or give --no-doc)", file=sys.stderr)
            return 2
    report: dict[str, Any] = {}
    ok = True
    if args.from_json:
        return _tabulate([Path(x) for x in args.from_json.split(",") if x], None if args.no_doc else args.doc,
                         args.section, cmd)
    if "scenarios" in parts:
        names = [x for x in args.scenarios.split(",") if x]
        print(f"real clock (time scale auto) against the virtual twin, first {args.tokens or 'all'} tokens", flush=True)
        modes = tuple(m for m in MODES if m[1] in args.modes.split(","))
        if not modes:
            print(f"error: --modes {args.modes}: give inproc, ws or both", file=sys.stderr)
            return 2

        measured = {"command": cmd, "revision": experiment.git_revision(), "machine": _machine()}

        def partial(rows: list[dict[str, Any]]) -> None:
            if args.json:
                Path(args.json).write_text(json.dumps({**measured, "scenarios": rows}, indent=2))

        rows = _scenarios(names, args.tokens, set(x for x in args.calibrate_only.split(",") if x), modes, partial)
        report.update(measured)
        report["scenarios"] = rows
        table = scenarios_table(rows)
        print(table)
        ok &= all(r.get("faithful", True) for r in rows)
        if not args.no_doc:
            write_between(args.doc, args.section, f"Measured by `{cmd}` at revision `{measured['revision']}` "
                                                  f"on {measured['machine']}:\n\n{table}")
    if "main" in parts:
        r = _main_job()
        report["main"] = r
        ok &= r["pass"]
        print(f"bandwidth_drop.yaml as shipped, time scale {r['time_scale']:g}: mean latency from token {r['cut']} on")
        for k, v in r["after_ms"].items():
            print(f"  {k:24s} {v:8.2f} ms  (wall {r['wall_s'][k]:.0f} s)")
        print(f"  resource_aware / static: real {r['ratio']['real']:.4f}, virtual {r['ratio']['virtual']:.4f} "
              f"({r['ratio']['real'] / r['ratio']['virtual'] - 1:+.2%}); migrations real {r['migrations']['real']}, "
              f"virtual {r['migrations']['virtual']}: {'PASS' if r['pass'] else 'FAIL'}")
    if "links" in parts:
        rows = run_loop(lambda: _links([float(x) for x in args.rates.split(",")], args.seconds), "real")
        report["links"] = rows
        print("links over websockets between two agent processes (latency 5 ms)")
        print(f"{'Mbit/s':>8} {'frame B':>8} {'frames':>7} {'measured':>10} {'error %':>8} "
              f"{'late mean':>10} {'p99':>7} {'max ms':>7}  result")
        for r in rows:
            ok &= r["pass"]
            print(f"{r['mbps']:8g} {r['frame_bytes']:8d} {r['received']:7d} {r['measured_mbps']:10.3f} "
                  f"{r['error_pct']:8.3f} {r['late_mean_ms']:10.3f} {r['late_p99_ms']:7.3f} {r['late_max_ms']:7.3f}  "
                  f"{'PASS' if r['pass'] else 'FAIL'}")
    if "host" in parts:
        names = [x for x in args.scenarios.split(",") if x] if args.scenarios != ALL else ["smollm2_bandwidth_drop"]
        rows = [_host(n, args.tokens, args.algorithm, args.repeat) for n in names]
        report["host"] = rows
        for r in rows:
            print(host_report(r))
    if "lag" in parts:
        rows = _lag([int(x) for x in args.agents.split(",")], args.tokens)
        report["lag"] = rows
        print("\nevent-loop lag (10 ms timer) during a real-clock run, one process per agent")
        print(f"{'agents':>6} {'agent mean':>11} {'agent p99':>10} {'agent max':>10} {'runner mean':>12} "
              f"{'runner p99':>11} {'runner max':>11} {'token ms':>9}  status")
        for r in rows:
            print(f"{r['agents']:6d} {r['agent_lag_mean_ms'] or 0:11.3f} {r['agent_lag_p99_ms'] or 0:10.3f} "
                  f"{r['agent_lag_max_ms'] or 0:10.3f} {r['runner_lag_mean_ms']:12.3f} {r['runner_lag_p99_ms']:11.3f} "
                  f"{r['runner_lag_max_ms']:11.3f} {r['latency_mean_ms']:9.2f}  {r['status']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
