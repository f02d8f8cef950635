"""Running an experiment grid (testbed/grid) and writing its directory: the thin shell.

Owns the experiment directory: `runs/KEY/` (each run's own directory, KEY the hash of its
resolved scenario, algorithm, seed and clock: a run is done when its directory is there; it
is written as `runs/KEY.partial/` and renamed when the run has ended, so an interrupted run
leaves nothing that counts), `runs.csv` (one row per run), `summary.csv` (per cell,
algorithm and figure: n, mean, sd, 95 % interval), `timing.csv` (wall time per run, the only
host-dependent file), `figures/FIGURE.png`, `README.md` and a copy of the experiment file.
`run_one` is the job a worker process (or a Dask worker) runs; the command line
(runners/sweep.py) chooses where. runs.csv and summary.csv are a function of the
experiment file and the selected cells and seeds alone on the virtual clock.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..grid.spec import Experiment, Run
from ..grid.stats import FIGURES, figures, summarize

RUNS = "runs"
PARTIAL = ".partial"
STATUS_DONE = "completed"

_prepared: dict[str, Any] = {}  # the last reference prepared in this worker process


def selected(exp: Experiment, cells: Sequence[int] | None = None,
             seeds: Sequence[int] | None = None) -> list[Run]:
    """The experiment's runs in the chosen cells and seeds (all by default), in the grid's
    order: cell, seed, algorithm."""
    return [r for r in exp.runs if (cells is None or r.cell.index in cells) and (seeds is None or r.seed in seeds)]


def done(out: Path, run: Run) -> bool:
    return (out / RUNS / run.key / "summary.json").is_file()


def clean_partial(out: Path) -> int:
    """Remove what interrupted runs left (`runs/*.partial`); how many."""
    n = 0
    for p in (out / RUNS).glob(f"*{PARTIAL}"):
        shutil.rmtree(p, ignore_errors=True)
        n += 1
    return n


def job(exp: Experiment, run: Run, out: Path) -> dict[str, Any]:
    """What a worker needs for one run: plain data only."""
    return {"scenario": run.scenario.raw, "scenario_file": run.scenario.file, "algorithm": run.algorithm,
            "key": run.key, "dir": str(out / RUNS / run.key), "clock": exp.clock,
            "time_scale": exp.time_scale or 1.0}


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One run in this process (a worker): the scenario read again from its data, the
    reference prepared (kept for the next run of the same scenario), the run written to
    `DIR.partial` and renamed to DIR when it has ended. A failed run is a finished run
    (its status says why); only an interruption leaves no directory."""
    import torch

    from ..placement.registry import lookup
    from ..scenario import parse
    from . import run as experiment

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    scen = parse(spec["scenario"], spec["scenario_file"])
    final = Path(spec["dir"])
    partial = final.with_name(final.name + PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    ref = json.dumps(scen.to_dict(), sort_keys=True, default=str)
    try:
        if ref not in _prepared:
            _prepared.clear()
            _prepared[ref] = experiment.prepare(scen)
        prep = _prepared[ref]
        algorithm = lookup(spec["algorithm"])
    except Exception as e:  # noqa: BLE001 (recorded as the run's failure, the others go on)
        status = f"failed: {type(e).__name__}: {e}"
        partial.mkdir(parents=True, exist_ok=True)
        (partial / "meta.json").write_text(json.dumps({"status": status, "algorithm": spec["algorithm"],
                                                       "seed": scen.seed}, indent=1))
        (partial / "summary.json").write_text(json.dumps({"status": status}, indent=1))
    else:
        outcome = experiment.run(prep, algorithm, partial, clock=spec["clock"], time_scale=spec["time_scale"])
        status = outcome.status
    os.replace(partial, final)
    return {"key": spec["key"], "status": status, "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# the experiment's files


def _cell_text(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _cut(run: Run) -> int | None:
    cuts = sorted(e.at_token for e in run.scenario.events if e.at_token is not None)
    return cuts[0] if cuts else None


def run_rows(exp: Experiment, runs: Sequence[Run], out: Path) -> list[dict[str, Any]]:
    """One row per run (done or not: a run without a directory has status `missing`), in
    the order cell, algorithm, seed."""
    rows = []
    for run in sorted(runs, key=lambda r: (r.cell.index, exp.algorithms.index(r.algorithm), r.seed)):
        d = out / RUNS / run.key
        summary: dict[str, Any] = {}
        status = "missing"
        if (d / "summary.json").is_file():
            summary = json.loads((d / "summary.json").read_text())
            status = str(summary.get("status", "failed: no status"))
        if status == STATUS_DONE and not summary.get("correctness", {}).get("tokens_match", False):
            status = "failed: tokens differ from the reference"
        figs = figures(summary, _cut(run)) if status == STATUS_DONE else dict.fromkeys(FIGURES)
        rows.append({"cell": run.cell.index, **{p: _cell_text(v) for p, v in run.cell.values},
                     "algorithm": run.algorithm, "seed": run.seed, "run": run.key, "status": status, **figs})
    return rows


def summary_rows(exp: Experiment, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell, algorithm and figure: n (completed runs), failed, mean, sd, 95 % interval."""
    out = []
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["cell"], r["algorithm"]), []).append(r)
    for (_cell, alg), items in groups.items():
        head = {k: items[0][k] for k in ("cell", *exp.axis_names)}
        ok = [r for r in items if r["status"] == STATUS_DONE]
        for fig in FIGURES:
            values = [float(r[fig]) for r in ok if r[fig] is not None]
            out.append({**head, "algorithm": alg, "figure": fig, "failed": len(items) - len(ok), **summarize(values)})
    return out


def _text(value: Any, precise: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if precise else format(value, ".10g")
    return str(value)


def csv_text(rows: Sequence[dict[str, Any]], precise: bool = True) -> str:
    """The rows as CSV text; floats in full (`precise`: the shortest text that reads back
    as the same float) or to 10 significant digits."""
    buf = io.StringIO()
    if not rows:
        return ""
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(rows[0]))
    for r in rows:
        w.writerow([_text(v, precise) for v in r.values()])
    return buf.getvalue()


def write_text(path: Path, text: str) -> None:
    """Whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_outputs(exp: Experiment, runs: Sequence[Run], out: Path, command: str,
                  timing: dict[str, float]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """runs.csv, summary.csv, timing.csv, the figures and README.md; (runs, summary rows)."""
    rows = run_rows(exp, runs, out)
    summary = summary_rows(exp, rows)
    write_text(out / "runs.csv", csv_text(rows, precise=True))
    write_text(out / "summary.csv", csv_text(summary, precise=False))
    old: dict[str, str] = {}
    if (out / "timing.csv").is_file():
        old = {r["run"]: r["wall_s"] for r in csv.DictReader(io.StringIO((out / "timing.csv").read_text()))}
    old.update({k: f"{v:.3f}" for k, v in timing.items()})
    write_text(out / "timing.csv", csv_text([{"run": r["run"], "wall_s": old.get(r["run"], "")} for r in rows]))
    shutil.copyfile(exp.file, out / "experiment.yaml")
    figs = plot(exp, summary, out / "figures")
    write_text(out / "README.md", readme(exp, rows, summary, command, figs))
    return rows, summary


def plot(exp: Experiment, summary: Sequence[dict[str, Any]], where: Path) -> list[str]:
    """One PNG per reported figure against the first axis: a line per algorithm (and per
    value of the other axes), its 95 % interval shaded. The files' names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    where.mkdir(parents=True, exist_ok=True)
    first, *others = exp.axis_names
    xs_all = [v for v in dict(exp.axes)[first]]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in xs_all)
    names = []
    for fig in exp.report:
        lines: dict[str, list[dict[str, Any]]] = {}
        for r in summary:
            if r["figure"] != fig:
                continue
            label = r["algorithm"] + "".join(f", {o}={r[o]}" for o in others)
            lines.setdefault(label, []).append(r)
        f, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        for label, items in lines.items():
            pts = [(float(r[first]) if numeric else str(r[first]), r) for r in items if r["mean"] is not None]
            if not numeric:
                pts = [(xs_all.index(next(v for v in xs_all if str(v) == x)), r) for x, r in pts]
            if not pts:
                continue
            x = [p for p, _ in pts]
            ax.plot(x, [r["mean"] for _, r in pts], marker="o", label=label)
            band = [(p, r) for p, r in pts if r["ci95_low"] is not None]
            if band:
                ax.fill_between([p for p, _ in band], [r["ci95_low"] for _, r in band],
                                [r["ci95_high"] for _, r in band], alpha=0.2)
        if numeric and xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 20:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(xs_all)), [str(v) for v in xs_all])
        ax.set_xlabel(first)
        ax.set_ylabel(FIGURES[fig][1])
        ax.set_title(f"{exp.name}: mean and 95 % interval over {len(exp.seeds)} seeds", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        f.tight_layout()
        name = f"{fig}.png"
        f.savefig(where / name, metadata={"Software": None})
        plt.close(f)
        names.append(name)
    return names


def readme(exp: Experiment, rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]], command: str,
           figs: Sequence[str]) -> str:
    ok = sum(r["status"] == STATUS_DONE for r in rows)
    missing = sum(r["status"] == "missing" for r in rows)
    failed = len(rows) - ok - missing
    axes = "; ".join(f"`{p}` in {list(v)}" for p, v in exp.axes)
    lines = [f"# Experiment {exp.name}", "", exp.description.strip(), "",
             f"Made by `{command}` (generated file; docs/experiments.md describes the directory).", "",
             f"- base scenario: `{os.path.relpath(exp.scenario_file, Path(exp.file).parent)}` "
             f"(relative to the experiment file); axes ({exp.combine}): {axes}",
             f"- algorithms: {', '.join(exp.algorithms)}; seeds: {len(exp.seeds)}; clock: {exp.clock}",
             f"- runs: {len(rows)}: {ok} completed, {failed} failed, {missing} missing", ""]
    fig = exp.report[0]
    lines += [f"## {FIGURES[fig][1]}: mean [95 % interval] (n)", "",
              "| " + " | ".join([*exp.axis_names, "algorithm", "mean", "95 % interval", "n"]) + " |",
              "|" + "---|" * (len(exp.axis_names) + 4)]
    for r in summary:
        if r["figure"] != fig:
            continue
        ci = "-" if r["ci95_low"] is None else f"{r['ci95_low']:.3f} .. {r['ci95_high']:.3f}"
        mean = "-" if r["mean"] is None else f"{r['mean']:.3f}"
        lines.append("| " + " | ".join([*(str(r[a]) for a in exp.axis_names), r["algorithm"], mean, ci,
                                         str(r["n"])]) + " |")
    lines += ["", "Files: `runs.csv` (one row per run), `summary.csv` (per cell, algorithm and figure), "
              "`timing.csv` (wall time, this host's), `runs/` (every run's directory), "
              "`experiment.yaml` (the file as run)."]
    lines += [f"\n![{f}](figures/{f})" for f in figs]
    return "\n".join(lines) + "\n"
