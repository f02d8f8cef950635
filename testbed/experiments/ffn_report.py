"""The FFN-shard experiment's report (results/paper/ffn/): where fine-grained partitioning
(heads + FFN shards) beats layer partitioning, from the CSVs of `python -m runners.sweep ffn`.

Two parts, both in analytic mode (the estimator the algorithms use, testbed/analytic/simulate.py):
the scale cases of the paper's experiment (b) with head-level placement with and without
FFN shards against layer_dp and equal_split, and a map of the speed-up over layer_dp across
link latency, bandwidth class and model size. Every figure in the README is computed here
from the CSVs; the command that made them is quoted in it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HEADS = "resource_aware_ls"  # head-level placement, FFN whole
SHARDS = "resource_aware_ls+ffn16"  # the same search with each layer's FFN in 16 shards
TP = "equal_split+ffn16"  # the tensor-parallel baseline: heads and shards dealt over every device


def map_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, bandwidth class, latency): mean speed-up over layer_dp of each algorithm
    on the same instances, and the oom count."""
    out = []
    cells = sorted({(r["model"], r["bandwidth_class"], float(r["latency_ms"])) for r in rows})
    for model, bw, lat in cells:
        rs = [r for r in rows if (r["model"], r["bandwidth_class"], float(r["latency_ms"])) == (model, bw, lat)]
        base = {r["instance"]: r["latency_mean_ms"] for r in rs
                if r["algorithm"] == "layer_dp" and r["status"] == "completed"}
        row: dict[str, Any] = {"model": model, "bandwidth_class": bw, "latency_ms": lat, "instances": len(base)}
        for alg in sorted({r["algorithm"] for r in rs}):
            done = [r for r in rs if r["algorithm"] == alg and r["status"] == "completed" and r["instance"] in base]
            sp = [base[r["instance"]] / r["latency_mean_ms"] for r in done]
            row[f"{alg}_ms"] = float(np.mean([r["latency_mean_ms"] for r in done])) if done else math.nan
            row[f"{alg}_speedup"] = float(np.mean(sp)) if sp else math.nan
            row[f"{alg}_oom"] = int(sum(r["oom"] for r in rs if r["algorithm"] == alg))
        out.append(row)
    return out


def fig_map(table: list[dict[str, Any]], path: Path) -> None:
    """Speed-up over layer_dp against link latency, one panel per model, one line per
    algorithm and bandwidth class."""
    models = sorted({r["model"] for r in table})
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for alg, style in ((SHARDS, "-"), (HEADS, "--"), (TP, ":")):
            for bw, colour in (("large", "tab:blue"), ("small", "tab:orange")):
                pts = sorted((r["latency_ms"], r.get(f"{alg}_speedup", math.nan)) for r in table
                             if r["model"] == model and r["bandwidth_class"] == bw)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", color=colour,
                            label=f"{alg}, {bw} links")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(2.0, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("link latency (ms)")
        ax.set_ylabel("speed-up over layer_dp")
        ax.set_title(model)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Where fine-grained partitioning wins (analytic mode; > 1: faster than layer_dp)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _f(v: float, nd: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def by_class(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (devices, model, bandwidth class): instances, and the mean speed-up over layer_dp
    (same instance) of heads alone and of heads + shards, with their migration stalls."""
    out = []
    for d, m, bw in sorted({(r["devices"], r["model"], r["bandwidth_class"]) for r in rows}):
        rs = [r for r in rows if (r["devices"], r["model"], r["bandwidth_class"]) == (d, m, bw)]
        base = {r["instance"]: r["latency_mean_ms"] for r in rs if r["algorithm"] == "layer_dp" and r["status"] == "completed"}
        row: dict[str, Any] = {"devices": d, "model": m, "bandwidth_class": bw, "instances": len(base)}
        for alg in (HEADS, SHARDS):
            done = [r for r in rs if r["algorithm"] == alg and r["status"] == "completed" and r["instance"] in base]
            row[alg] = float(np.mean([base[r["instance"]] / r["latency_mean_ms"] for r in done])) if done else math.nan
            row[f"{alg}_stall_ms"] = float(np.mean([r["stall_ms"] for r in done])) if done else math.nan
        out.append(row)
    return out


def readme(scale: list[dict[str, Any]], table: list[dict[str, Any]], command: str, scale_note: str,
           map_note: str, revision: str, rows: list[dict[str, Any]] | None = None, why: str = "") -> str:
    """The README: the scale table, the verdict at 48 and 25 devices, the map and where each
    approach wins."""
    lines = ["# FFN shards: where fine-grained partitioning beats layers", "",
             "Regenerate everything on this page (CSVs, tables, figure) with:", "", "```sh",
             f".venv/bin/python -m {command}", "```", "",
             f"Measured at revision `{revision}`. **Mode: analytic** (the estimator the algorithms use, "
             "as in [the paper's experiments](../README.md)). `ALG+ffn16` is ALG on the same instance with "
             "`model.ffn_shards: 16` ([models](../../../docs/models.md#ffn-shards)); `resource_aware_ls+ffn16` "
             "also starts from the best hybrid tensor-parallel plan "
             "([algorithms](../../../docs/algorithms.md#ffn-shards)); `equal_split+ffn16` is the "
             "tensor-parallel baseline (heads and shards dealt over every device, links ignored).", "",
             "## Scale: 25 and 48 devices", "", scale_note, "",
             "| devices | model | algorithm | runs | tokens | mean latency ms | speed-up vs layer_dp | oom |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in scale:
        lines.append(f"| {r['devices']} | {r['model']} | {r['algorithm']} | {r['completed']}/{r['instances']} | "
                     f"{r['tokens_mean']:.0f} | {_f(r['latency_mean_ms'])} | {_f(r['speedup_vs_layer_dp'])} | {r['oom']} |")
    lines.append("")
    for devices in sorted({r["devices"] for r in scale}):
        for model in sorted({r["model"] for r in scale if r["devices"] == devices}):
            rs = {r["algorithm"]: r for r in scale if r["devices"] == devices and r["model"] == model}
            s, h = rs.get(SHARDS), rs.get(HEADS)
            if s is None:
                continue
            met = s["speedup_vs_layer_dp"] >= 2.0 and s["oom"] == 0
            lines.append(f"- {model} on {devices} devices: heads + FFN shards {_f(s['speedup_vs_layer_dp'])}x "
                         f"layer_dp (oom {s['oom']}), heads alone {_f(h['speedup_vs_layer_dp']) if h else 'n/a'}x: "
                         f"2x target **{'met' if met else 'not met'}**.")
    if rows:
        lines += ["", "By bandwidth class (mean over the instances of that class; stall = migration time per run):", "",
                  "| devices | model | links | instances | heads (x) | heads + shards (x) | stall ms, heads | stall ms, heads + shards |",
                  "|---:|---|---|---:|---:|---:|---:|---:|"]
        for r in by_class(rows):
            lines.append(f"| {r['devices']} | {r['model']} | {r['bandwidth_class']} | {r['instances']} | {_f(r[HEADS])} | "
                         f"{_f(r[SHARDS])} | {_f(r[f'{HEADS}_stall_ms'], 0)} | {_f(r[f'{SHARDS}_stall_ms'], 0)} |")
    if why:
        lines += ["", why]
    lines += ["", "## The speed-up map", "", map_note, "",
              "| model | links | latency ms | instances | layer_dp ms | heads (x) | heads + shards (x) | "
              "tensor-parallel (x) | winner |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in table:
        sp = {a: r.get(f"{a}_speedup", math.nan) for a in (HEADS, SHARDS, TP)}
        cand = {"layer_dp": 1.0, **{a: v for a, v in sp.items() if not math.isnan(v)}}
        win = max(cand, key=lambda a: cand[a])
        lines.append(f"| {r['model']} | {r['bandwidth_class']} | {r['latency_ms']:g} | {r['instances']} | "
                     f"{_f(r.get('layer_dp_ms', math.nan))} | {_f(sp[HEADS])} | {_f(sp[SHARDS])} | {_f(sp[TP])} | {win} |")
    lines += ["", "![speed-up map](fig_ffnmap.png)", ""]
    for model in sorted({r["model"] for r in table}):
        for bw in ("large", "small"):
            pts = sorted((r["latency_ms"], r.get(f"{SHARDS}_speedup", math.nan)) for r in table
                         if r["model"] == model and r["bandwidth_class"] == bw)
            if not pts:
                continue
            above = [lat for lat, v in pts if v >= 2.0]
            wins = [lat for lat, v in pts if v > 1.0 + 1e-9]
            lines.append(f"- {model}, {bw} links: heads + shards faster than layer_dp at "
                         f"{', '.join(f'{x:g}' for x in wins) + ' ms' if wins else 'no latency tested'}; 2x or more at "
                         f"{', '.join(f'{x:g}' for x in above) + ' ms' if above else 'no latency tested'}.")
    return "\n".join(lines) + "\n"


def why_text() -> str:
    """What one hop costs against one layer's work, from the cost model and the sweep's
    ranges (testbed/analytic/simulate.py): why splitting a layer pays on fast links only."""
    from ..analytic.simulate import BANDWIDTH, COMPUTE_RANGE, LATENCY_RANGE
    from ..model import cost
    from ..model.spec import from_name

    s = from_name("gpt-32x32")
    frame = cost.hidden_bytes(s)
    layer = s.groups * cost.decode_flops(s, "head", 64) + cost.decode_flops(s, "proj", 64) + cost.decode_flops(s, "ffn", 64)
    mid = {k: (lo * hi) ** 0.5 / 8 for k, (lo, hi) in BANDWIDTH.items()}  # bytes/s, geometric middle
    lat = sum(LATENCY_RANGE) / 2
    hop = {k: frame / r + lat for k, r in mid.items()}
    fast = layer / COMPUTE_RANGE[1]
    return (f"Why: a gpt-32x32 layer is {layer / 1e6:.0f} MFLOP, {fast * 1e3:.1f} ms on the fastest device the "
            f"instances draw ({COMPUTE_RANGE[1] / 1e9:.0f} GFLOP/s). Split over devices it crosses four hops per "
            f"layer (x to the heads, their outputs to proj, y to the shards, their partial sums back), each a "
            f"{frame / 1024:.0f} KiB frame: {hop['large'] * 1e3:.2f} ms on a large-class link and "
            f"{hop['small'] * 1e3:.2f} ms on a small-class one (the classes' geometric middle rate, "
            f"{lat * 1e3:.2f} ms mean latency). Four hops on small-class links: {4 * hop['small'] * 1e3:.2f} ms, "
            f"{'more' if 4 * hop['small'] > fast else 'less'} than the whole layer on that device; on large-class "
            f"links {4 * hop['large'] * 1e3:.2f} ms, most of it latency, which the map below varies.")
