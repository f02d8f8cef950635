"""`python -m runners.sweep EXPERIMENT`: an experiment file of your own, or the paper's sweeps.

`python -m runners.sweep EXPERIMENT.yaml` runs an experiment file (docs/experiments.md):
every cell x algorithm x seed through the full emulator, in parallel processes or on a Dask
cluster, skipping the runs already in its directory (default results/experiments/NAME/),
and writes runs.csv, summary.csv, figures and README.md there. Exit status: 0 every run
completed, 1 a run failed (the others ran; runs.csv says which), 2 bad input (one line
naming the file, key and cell; nothing written), 130 interrupted (the runs under way end and
are kept; the same command resumes).

The paper's sweeps (every algorithm on identical random instances): (the paper's claims): `optimality` (3, 4 and 5 devices; per-token latency of every
algorithm divided by the exact optimum's), `scale` (25 and 48 devices, long generations:
head-level algorithms against layer-based partitioning), `paper` (both, written to
results/paper/ with tables and figures: the committed reference results), `ffn` (FFN
shards: the scale cases and a speed-up map over link latency, bandwidth and model size,
written to results/paper/ffn/). `--roofline`
gives the devices a memory bandwidth too (optimality and scale only; docs/devices.md).
Analytic mode (testbed/analytic/simulate.py): the shared estimator instead of emulated agents; every
output says so. Instances and seeds are identical for every algorithm; jobs run in
parallel processes (`--jobs`), or on a Dask cluster (`--cluster ADDRESS`, or `local` for
one started here with `--jobs` workers; the `cluster` extra), which changes nothing but
wall time. The result CSVs are a function of the arguments alone (the same bytes on any
machine); wall-clock figures (decision time, time per run) go to `timing.csv` only.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from testbed.analytic.simulate import (
    OPT_ALGS,
    SCALE_ALGS,
    TIMING_COLUMNS,
    add_ratios,
    make_instance,
    optimality_table,
    scale_table,
    simulate,
    timing_table,
    variant,
)
from testbed.placement.registry import get_algorithm

OPT_MODELS = ["paper-small", "paper-medium", "paper-large", "paper-xl", "gpt-tiny"]
SCALE_CASES = [(25, "gpt2-small"), (48, "gpt-32x32"), (25, "paper-xl"), (48, "paper-xl")]
# resource_aware_ls's evaluation budget per decision in `scale` (hundreds of decisions on up
# to 1088 blocks): a count, so the tables do not depend on the host's speed, small enough
# for the sweep to finish in minutes
SCALE_LS_EVALS = 3000


def _job(kind: str, devices: int, model: str, index: int, seed: int, tokens: int, interval: int,
         algorithms: list[str], roofline: bool = False, latency_ms: float | None = None,
         bandwidth_class: str | None = None, decision_cost: bool = False) -> list[dict[str, Any]]:
    """One instance, every algorithm (runs in a worker process); `roofline`: the devices
    have a memory bandwidth too (the same instance otherwise); `latency_ms` and
    `bandwidth_class` fix the links' latency and bandwidth class (the speed-up map);
    `decision_cost`: a decision stalls its token by its modelled cost (the paper's model,
    the default, leaves decisions free: its latency is inference and migration)."""
    import torch  # noqa: F401  (imported by the registry anyway; keep threads low)

    torch.set_num_threads(1)
    rng = np.random.default_rng([seed, devices, index, OPT_MODELS.index(model) if model in OPT_MODELS else 99])
    fixed: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if latency_ms is not None:
        fixed["latency"] = (latency_ms / 1e3, latency_ms / 1e3)
        extra["latency_ms"] = latency_ms
    inst = make_instance(model, devices, tokens, rng, ident=f"{kind}-{devices}-{index}", roofline=roofline,
                         bandwidth_class=bandwidth_class, **fixed)
    rows = []
    for name in algorithms:
        run_inst, base = variant(inst, name)  # `ALG+ffnN`: the model's FFN in N shards
        alg = get_algorithm(base)
        if base == "resource_aware_ls" and kind in ("scale", "ffnmap"):
            alg.max_evals = SCALE_LS_EVALS
        t0 = time.perf_counter()
        r = simulate(run_inst, alg, interval=interval, decision_cost=decision_cost)
        rows.append({"experiment": kind, "mode": "analytic", "devices": devices, "instance": index,
                     "model": model, "bandwidth_class": inst.bandwidth_class, "prompt": inst.prompt,
                     "interval": interval, "seed": seed, **({"compute_model": "roofline"} if roofline else {}),
                     **({"decision_cost": "modelled"} if decision_cost else {}),
                     **extra, **r.row(), "algorithm": name, "wall_s": time.perf_counter() - t0})
    return rows


class ClusterUnavailable(Exception):
    """--cluster was asked for but cannot be had (the extra is missing, or no scheduler)."""


@contextmanager
def pool(workers: int, cluster: str | None = None,
         initializer: Callable[[], None] | None = None) -> Iterator[Executor]:
    """Where the jobs run: `workers` local processes, or a Dask cluster (`cluster`: a
    scheduler's address, or `local` to start one here with `workers` single-threaded worker
    processes). Dask's executor is a concurrent.futures one, so the rest is the same code;
    the jobs are pure functions of their arguments, so where they run changes no result."""
    if cluster is None:
        with ProcessPoolExecutor(max_workers=workers, initializer=initializer) as ex:
            yield ex
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ClusterUnavailable("--cluster needs the `cluster` extra: pip install -c constraints.txt "
                                 "-e '.[cluster]'") from None
    local = None
    try:
        if cluster == "local":
            local = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                 dashboard_address=None)
        client = Client(local if local is not None else cluster, timeout="10s")
    except (OSError, TimeoutError, ValueError) as e:  # refused, timed out, not an address
        if local is not None:
            local.close()
        raise ClusterUnavailable(f"--cluster {cluster}: cannot reach a Dask scheduler ({e})") from None
    try:
        with client.get_executor() as ex:
            yield ex
    finally:
        client.close()
        if local is not None:
            local.close()


def run_jobs(jobs: list[tuple], ex: Executor, console: Console, label: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    bar = Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("instances"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not console.is_terminal)
    with bar:
        task = bar.add_task(label, total=len(jobs))
        futs = [ex.submit(_job, *j) for j in jobs]
        for f in as_completed(futs):
            rows.extend(f.result())
            bar.advance(task)
    rows.sort(key=lambda r: (r["devices"], r["instance"], r["model"], r["algorithm"]))
    return rows


def write_csv(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    rows = list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    os.replace(tmp, path)


def split_timing(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(results without wall-clock columns, one timing row per result keyed like it)."""
    keys = ("experiment", "devices", "model", "instance", "algorithm")
    results = [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]
    timing = [{**{k: r[k] for k in keys}, **{k: r[k] for k in TIMING_COLUMNS}} for r in rows]
    return results, timing


def print_table(console: Console, title: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    t = Table(title=title)
    for k in rows[0]:
        t.add_column(k, justify="right" if isinstance(rows[0][k], (int, float)) else "left")
    for r in rows:
        t.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()])
    console.print(t)


def optimality(args: argparse.Namespace, ex: Executor,
               console: Console) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    algs = args.algorithms.split(",") if args.algorithms else OPT_ALGS
    if "optimal" not in algs:
        algs = ["optimal", *algs]
    jobs = [("optimality", d, OPT_MODELS[i % len(OPT_MODELS)], i, args.seed, args.tokens or 16, 1, algs, args.roofline, None, None, args.decision_cost)
            for d in (3, 4, 5) for i in range(args.instances or 50)]
    rows = run_jobs(jobs, ex, console, "optimality")
    add_ratios(rows)
    return rows, optimality_table(rows)


def scale(args: argparse.Namespace, ex: Executor, console: Console) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    algs = args.algorithms.split(",") if args.algorithms else SCALE_ALGS
    jobs = [("scale", d, m, i, args.seed, args.tokens or 1000, 4, algs, args.roofline, None, None, args.decision_cost)
            for d, m in SCALE_CASES for i in range(args.instances or 3)]
    rows = run_jobs(jobs, ex, console, "scale")
    return rows, scale_table(rows)


# `ffn`: FFN shards against layers (results/paper/ffn/; testbed/experiments/ffn_report.py).
# Sized for a shared 2-core host (a few minutes): at scale 3 instances of 60 tokens, in the
# map 2 instances of 12 tokens per cell by default; --instances and --tokens set both larger.
FFN_ALGS = ["layer_dp", "equal_split", "resource_aware_ls", "resource_aware_ls+ffn16", "equal_split+ffn16"]
FFN_SCALE_CASES = [*SCALE_CASES, (25, "gpt-32x32")]
FFN_MAP_ALGS = ["layer_dp", "resource_aware_ls", "resource_aware_ls+ffn16", "equal_split+ffn16"]
FFN_MAP_MODELS = ["gpt2-small", "gpt-32x32"]
FFN_MAP_DEVICES = 25
FFN_MAP_LATENCY_MS = [0.05, 0.2, 0.5, 1.0, 5.0]
FFN_SCALE_RUNS = (3, 60)  # instances per case, tokens per run (the defaults)
FFN_MAP_RUNS = (2, 12)  # instances per cell, tokens per run


def ffn(args: argparse.Namespace, ex: Executor, console: Console, out: Path, revision: str) -> None:
    from testbed.experiments import ffn_report

    instances, tokens = args.instances or FFN_SCALE_RUNS[0], args.tokens or FFN_SCALE_RUNS[1]
    map_instances, map_tokens = args.instances or FFN_MAP_RUNS[0], args.tokens or FFN_MAP_RUNS[1]
    jobs: list[tuple] = [("scale", d, m, i, args.seed, tokens, 4, FFN_ALGS)
                         for d, m in FFN_SCALE_CASES for i in range(instances)]
    rows, timing = split_timing(run_jobs(jobs, ex, console, "ffn scale"))
    table = scale_table(rows)
    write_csv(out / "scale.csv", rows)
    write_csv(out / "scale_summary.csv", table)
    print_table(console, "heads and FFN shards vs layers at scale (analytic mode)", table)
    jobs = [("ffnmap", FFN_MAP_DEVICES, m, i, args.seed, map_tokens, 4, FFN_MAP_ALGS, False, lat, bw)
            for m in FFN_MAP_MODELS for bw in ("large", "small") for lat in FFN_MAP_LATENCY_MS
            for i in range(map_instances)]
    mrows, mtiming = split_timing(run_jobs(jobs, ex, console, "ffn map"))
    mrows.sort(key=lambda r: (r["model"], r["bandwidth_class"], r["latency_ms"], r["instance"], r["algorithm"]))
    mtable = ffn_report.map_table(mrows)
    write_csv(out / "map.csv", mrows)
    write_csv(out / "map_summary.csv", mtable)
    write_csv(out / "timing.csv", timing + mtiming)
    ffn_report.fig_map(mtable, out / "fig_ffnmap.png")
    argv = " ".join(["runners.sweep", "ffn", *(["--instances", str(args.instances)] if args.instances else []),
                     *(["--tokens", str(args.tokens)] if args.tokens else [])])
    scale_note = (f"{instances} instances per case ({', '.join(f'{m} on {d}' for d, m in FFN_SCALE_CASES)} devices), "
                  f"{tokens} generated tokens per run, re-planning every 4 tokens; the paper's sweep uses "
                  "3 instances and 1000 tokens (fewer here: the fine-grained search takes about a second per "
                  "decision on 48 devices). Speed-up = layer_dp's mean latency over the algorithm's, same instance.")
    map_note = (f"{FFN_MAP_DEVICES} devices of the paper's tiers, every link at one latency, bandwidths drawn from one "
                f"class; {map_instances} instances per cell, {map_tokens} tokens, re-planning every 4 tokens. "
                "Columns: mean speed-up over layer_dp on the same instances.")
    (out / "README.md").write_text(ffn_report.readme(table, mtable, argv, scale_note, map_note, revision, rows,
                                                     ffn_report.why_text()))


PAPER_SWEEPS = ("optimality", "scale", "paper", "ffn")


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    first = next((a for a in args_in if not a.startswith("-")), None)
    if first is not None and first not in PAPER_SWEEPS and "-h" not in args_in and "--help" not in args_in:
        return grid_main(args_in)
    ap = argparse.ArgumentParser(prog="python -m runners.sweep", description=__doc__.split("\n")[0])
    ap.add_argument("experiment", help="optimality, scale, paper or ffn; or an experiment file (EXPERIMENT.yaml, "
                    "docs/experiments.md; `python -m runners.sweep X.yaml --help` for its options)")
    ap.add_argument("--instances", type=int, help="instances per size (optimality: 50, scale: 3)")
    ap.add_argument("--tokens", type=int, help="tokens per run (optimality: 16, scale: 1000)")
    ap.add_argument("--algorithms", help="comma-separated (default: the experiment's set)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="worker processes (here, or of --cluster local)")
    ap.add_argument("--cluster", metavar="ADDRESS",
                    help="run the instances on a Dask cluster: a scheduler's address (tcp://host:8786), "
                         "or `local` to start one here (needs the `cluster` extra)")
    ap.add_argument("--out", type=Path, help="directory for the CSVs (default results/sweeps/ or results/paper/)")
    ap.add_argument("--quick", action="store_true", help="a reduced version (CI): few instances and tokens")
    ap.add_argument("--no-check", action="store_true", help="paper: skip the report's emulator cross-check")
    ap.add_argument("--roofline", action="store_true",
                    help="devices also have a memory bandwidth (a job takes max(FLOPs / rate, bytes / bandwidth); "
                         "docs/devices.md); not with `paper`, whose experiments keep the FLOP model")
    ap.add_argument("--decision-cost", action="store_true",
                    help="a decision stalls its token by its modelled cost on the controller's device, as in the "
                         "emulator (default: free, the paper's model; measured decision times go to timing.csv)")
    args = ap.parse_args(argv)
    if args.experiment not in PAPER_SWEEPS:
        return grid_main(args_in)
    if args.roofline and args.experiment == "paper":
        print("error: --roofline: the paper's experiments keep the FLOP model; run optimality or scale with it",
              file=sys.stderr)
        return 2
    if args.decision_cost and args.experiment == "paper":
        print("error: --decision-cost: the paper's experiments keep the paper's model (decisions free); "
              "run optimality or scale with it", file=sys.stderr)
        return 2
    if args.quick:
        args.instances = args.instances or 4
        args.tokens = args.tokens or 8
    if args.algorithms:
        from testbed.placement import ALGORITHM_NAMES

        def known(a: str) -> bool:  # a built-in, or `ALG+ffnN` (ALG with the FFN in N shards)
            base, sep, n = a.partition("+ffn")
            return base in ALGORITHM_NAMES and (not sep or (n.isdigit() and int(n) > 0))

        bad = [a for a in args.algorithms.split(",") if not known(a)]
        if bad:
            print(f"error: --algorithm: unknown {', '.join(bad)} (known: {', '.join(ALGORITHM_NAMES)})", file=sys.stderr)
            return 2
    console = Console(highlight=False) if sys.stdout.isatty() else Console(highlight=False, width=160)
    out = args.out or Path("results") / ("paper" if args.experiment == "paper" else
                                         "paper/ffn" if args.experiment == "ffn" else
                                         "sweeps_roofline" if args.roofline else "sweeps")
    t0 = time.perf_counter()
    from testbed.experiments.run import git_revision

    revision = git_revision()  # before this sweep writes into a tracked directory
    summary: dict[str, list[dict[str, Any]]] = {}
    timing: list[dict[str, Any]] = []
    titles = {"optimality": "per-token latency / optimum's (analytic mode)",
              "scale": "head-level vs layer-based at scale (analytic mode)"}
    if args.experiment == "ffn":
        with pool(args.jobs, args.cluster) as ex:
            ffn(args, ex, console, out, revision)
        console.print(f"wrote {out} in {time.perf_counter() - t0:.0f} s", markup=False)
        return 0
    try:
        with pool(args.jobs, args.cluster) as ex:  # one pool (or cluster) for every experiment
            for name, experiment in (("optimality", optimality), ("scale", scale)):
                if args.experiment not in (name, "paper"):
                    continue
                if name == "scale" and args.experiment == "paper":
                    args.instances, args.tokens = (None, None) if not args.quick else (2, 40)
                rows, table = experiment(args, ex, console)
                rows, t = split_timing(rows)
                timing += t
                write_csv(out / f"{name}.csv", rows)
                write_csv(out / f"{name}_summary.csv", table)
                print_table(console, titles[name], table)
                summary[name] = table
    except ClusterUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_csv(out / "timing.csv", timing)
    print_table(console, "decision time, wall clock on this machine", timing_table(timing))
    if args.experiment == "paper":
        from testbed.experiments.paper_report import write_report

        write_report(out, summary, wall_s=time.perf_counter() - t0, argv=sys.argv[1:] if argv is None else argv,
                     check=not args.no_check, jobs=args.jobs, revision=revision)
    console.print(f"wrote {out} in {time.perf_counter() - t0:.0f} s", markup=False)
    return 0


# ---------------------------------------------------------------------------------------------
# experiment files


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def _ignore_sigint() -> None:
    """A worker's: Ctrl-C is the parent's to handle (it lets the runs under way end)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def grid_main(argv: list[str]) -> int:
    from testbed.experiments import grid_run
    from testbed.grid import spec

    ap = argparse.ArgumentParser(prog="python -m runners.sweep EXPERIMENT.yaml",
                                 description="Run an experiment file: a grid of scenario values x algorithms x "
                                             "seeds (docs/experiments.md).")
    ap.add_argument("experiment", type=Path, help="the experiment file")
    ap.add_argument("--out", type=Path, help="its directory (default results/experiments/NAME)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="runs at once: worker processes (here, or of --cluster local)")
    ap.add_argument("--cluster", metavar="ADDRESS",
                    help="run on a Dask cluster: a scheduler's address (tcp://host:8786), or `local` to start "
                         "one here (needs the `cluster` extra)")
    ap.add_argument("--cells", help="only these cells (comma-separated indices, as in runs.csv)")
    ap.add_argument("--seeds", help="only these seeds (comma-separated)")
    args = ap.parse_args(argv)
    err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
    console = Console(highlight=False, emoji=False) if sys.stdout.isatty() else Console(highlight=False, width=160)
    try:
        exp = spec.load(args.experiment)
        cells = _ints(args.cells, "--cells") if args.cells else None
        seeds = _ints(args.seeds, "--seeds") if args.seeds else None
    except (spec.ExperimentError, ValueError) as e:
        err.print(f"error: {e}", markup=False)
        return 2
    if cells is not None and (bad := [c for c in cells if not 0 <= c < len(exp.cells)]):
        err.print(f"error: {args.experiment}: --cells: no cell {bad[0]} (cells 0 to {len(exp.cells) - 1})", markup=False)
        return 2
    if seeds is not None and (bad := [s for s in seeds if s not in exp.seeds]):
        err.print(f"error: {args.experiment}: --seeds: seed {bad[0]} is not one of the experiment's", markup=False)
        return 2
    if args.jobs < 1:
        err.print(f"error: {args.experiment}: --jobs: must be >= 1", markup=False)
        return 2
    problem = _check_algorithms(exp)
    if problem:
        err.print(f"error: {problem}", markup=False)
        return 2
    out = args.out or Path("results") / "experiments" / exp.name
    runs = grid_run.selected(exp, cells, seeds)
    try:
        (out / grid_run.RUNS).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        err.print(f"error: --out: cannot create {out}: {e.strerror or e}", markup=False)
        return 2
    grid_run.clean_partial(out)
    todo = [r for r in runs if not grid_run.done(out, r)]
    console.print(f"{exp.name}: {len(exp.cells)} cell(s) x {len(exp.algorithms)} algorithm(s) x "
                  f"{len(exp.seeds)} seed(s); {len(runs)} run(s) selected, {len(runs) - len(todo)} already done, "
                  f"{len(todo)} to run", markup=False)
    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    try:
        with pool(args.jobs, args.cluster, _ignore_sigint) as ex:
            _run_grid(exp, todo, out, ex, console, timing)
    except ClusterUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        left = sum(not grid_run.done(out, r) for r in runs)
        err.print(f"interrupted: {len(runs) - left} of {len(runs)} runs done; the same command runs the other "
                  f"{left}", markup=False)
        return 130
    command = " ".join(["python -m runners.sweep", str(args.experiment),
                        *([f"--out {args.out}"] if args.out else []),
                        *([f"--cells {args.cells}"] if args.cells else []),
                        *([f"--seeds {args.seeds}"] if args.seeds else [])])
    rows, _ = grid_run.write_outputs(exp, runs, out, command, timing)
    failed = [r for r in rows if r["status"] != grid_run.STATUS_DONE]
    for r in failed[:10]:
        err.print(f"failed: cell {r['cell']}, {r['algorithm']}, seed {r['seed']}: {r['status']} "
                  f"({out / grid_run.RUNS / r['run']})", markup=False)
    if len(failed) > 10:
        err.print(f"... and {len(failed) - 10} more failed run(s): see runs.csv", markup=False)
    console.print(f"ran {len(todo)} run(s) in {time.perf_counter() - t0:.0f} s; {len(rows) - len(failed)} of "
                  f"{len(rows)} completed; wrote {out}/runs.csv, summary.csv, README.md", markup=False)
    return 1 if failed else 0


def _check_algorithms(exp: Any) -> str | None:
    """Every algorithm loads (plug-ins included) and takes every cell's size: else why not."""
    from testbed.placement.plugins import PluginRefused
    from testbed.placement.registry import lookup, size_problem

    for i, name in enumerate(exp.algorithms):
        try:
            lookup(name)
        except PluginRefused as e:
            return f"{exp.file}: algorithms[{i}]: {e}"
        for cell in exp.cells:
            scen = next(r.scenario for r in exp.runs if r.cell is cell)
            why = size_problem(name, scen.model.layers, len(scen.devices) + len(scen.joins()))
            if why:
                return f"{exp.file}: algorithms[{i}]: cell {cell.index} ({cell.label()}): {why}"
    return None


def _run_grid(exp: Any, todo: list[Any], out: Path, ex: Executor, console: Console,
              timing: dict[str, float]) -> None:
    from testbed.experiments import grid_run

    bar = Progress(TextColumn(f"[bold]{exp.name}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"),
                   TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), console=console,
                   disable=not console.is_terminal)
    futs = [ex.submit(grid_run.run_one, grid_run.job(exp, r, out)) for r in todo]
    try:
        with bar:
            task = bar.add_task(exp.name, total=len(todo))
            for f in as_completed(futs):
                try:
                    res = f.result()
                    timing[res["key"]] = res["wall_s"]
                except Exception as e:  # noqa: BLE001 (a worker lost: that run stays missing, the rest go on)
                    console.print(f"a run's worker failed: {type(e).__name__}: {e}", markup=False)
                bar.advance(task)
    except KeyboardInterrupt:
        for f in futs:
            f.cancel()  # the runs under way end and are kept; the rest are not started
        raise


if __name__ == "__main__":
    sys.exit(main())
