"""Figure of runs: per-token latency (top) and the placement over time (one panel per run).

`python -m tools.plot RUN_DIR... -o fig.png [--placement ALG[,ALG...]] [--title T] [--dpi N] [--ymax MS]`

RUN_DIR is a run directory or any directory above runs. The top panel has one line per run
(decode tokens; the prefill, token 0, is given in the legend), labelled by algorithm (and
seed if the runs have several), scenario events from events.csv as labelled dashed vertical
lines (an event at token k applies between tokens k-1 and k), tokens that migrated blocks
as diamonds on their run's line, and where a run failed a cross. When a few tokens (a
migration stall) would flatten the rest, the y axis is cut above the bulk and the cut
tokens are marked with their values at the top; `--ymax` sets the cut by hand. Below, for
every run (or only the runs of the algorithms given by `--placement`), a block x token map:
one row per block in model order (per layer its heads, proj, ffn; thin white lines between
layers), one column per token, coloured by the device holding it (from placements.csv),
with the devices' legend. Exit status: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from rich.console import Console  # noqa: E402

from testbed.common.stats import percentile  # noqa: E402
from testbed.results.read import (  # noqa: E402
    Run,
    RunsError,
    add_runs_argument,
    block_key,
    block_layer,
    labels,
    load_runs,
    scenario_events,
)

RUN_COLORS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#a6761d", "#e6ab02",
              "#666666", "#1f78b4", "#b2182b"]
EVENT_COLOR = "#555555"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.plot",
        description="Plot per-token latency and placement over time of one or more runs.")
    add_runs_argument(p)
    p.add_argument("-o", "--output", type=Path, required=True, help="image to write (.png, .pdf, .svg)")
    p.add_argument("--placement", action="append", metavar="ALG",
                   help="placement panels only for these algorithms (repeat or comma-separate); "
                        "default: every run")
    p.add_argument("--title", help="figure title (default: the scenario name and set-up)")
    p.add_argument("--dpi", type=int, default=150, help="resolution of raster images (default 150)")
    p.add_argument("--ymax", type=float, help="upper end of the latency axis in ms (default: automatic)")
    return p.parse_args(argv)


def _reason(status: str) -> str:
    s = status.removeprefix("failed: ")
    return s if len(s) <= 64 else s[:63] + "..."


# ---------------------------------------------------------------------------- panels


def device_colors(runs: list[Run]) -> dict[str, Any]:
    names: list[str] = []
    for r in runs:
        for d in r.devices():
            if d not in names:
                names.append(d)
    n = len(names)
    if n <= 10:
        cols = [plt.get_cmap("tab10")(i) for i in range(n)]
    elif n <= 20:
        cols = [plt.get_cmap("tab20")(i) for i in range(n)]
    else:
        cols = [plt.get_cmap("turbo")(x) for x in np.linspace(0.05, 0.95, n)]
    return dict(zip(names, cols, strict=True))


def _ylimit(runs: list[Run], ymax: float | None) -> tuple[float, bool]:
    """Top of the latency axis and whether points above it are cut (an infinite latency,
    which a hand-edited tokens.csv may hold, is always drawn cut, at the top)."""
    lat = {r.path: [x["latency_ms"] for x in r.decode if math.isfinite(x["latency_ms"])] for r in runs}
    infinite = any(math.isinf(x["latency_ms"]) for r in runs for x in r.decode)
    top = max((max(v) for v in lat.values() if v), default=1.0)
    if ymax is not None:
        return ymax, top > ymax or infinite
    bulk = max((percentile(v, 95) for v in lat.values() if v), default=top)
    cut = bulk * 1.6
    if top > cut * 1.2:
        return cut, True
    return top * 1.08 if top > 0 else 1.0, infinite


def latency_panel(ax: Any, runs: list[Run], names: dict[Path, str], xmax: int, ymax: float | None) -> None:
    top, cut = _ylimit(runs, ymax)
    arrows = False
    for i, r in enumerate(runs):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        dec = r.decode
        xs = [x["token"] for x in dec]
        ys = [x["latency_ms"] for x in dec]
        pre = [x["latency_ms"] for x in r.tokens if x.get("phase") == "prefill"]
        label = names[r.path]
        if pre:
            label += f"  (prefill {pre[0]:.0f} ms)"
        if not r.ok:
            label += "  FAILED"
        # earlier runs drawn wider, so lines that coincide show as stripes
        ax.plot(xs, ys, color=color, lw=min(4.0, 1.2 + 1.0 * (len(runs) - 1 - i)), label=label, zorder=3 + i * 0.01)
        for x in dec:
            high = cut and x["latency_ms"] > top
            moved = x.get("migrations", 0) > 0
            if not (high or moved):
                continue
            y = min(x["latency_ms"], top)
            if moved:
                ax.plot([x["token"]], [y], marker="D", ms=7, mfc=color, mec="black", mew=0.8, zorder=6,
                        clip_on=False)
            else:
                ax.plot([x["token"]], [top], marker="^", color=color, ms=7, clip_on=False, zorder=5)
                arrows = True
            parts = [f"{x['migrations']} block(s) moved"] if moved else []
            if high:
                parts.append(f"{x['latency_ms']:.0f} ms")
            ax.annotate(", ".join(parts), (x["token"], y), xytext=(7, -2), textcoords="offset points",
                        ha="left", va="top", fontsize=7.5, color=color, zorder=7,
                        bbox={"fc": "white", "ec": "none", "alpha": 0.75, "pad": 0.5})
        if not r.ok and dec:
            last = dec[-1]
            y = min(last["latency_ms"], top)
            right = last["token"] > 0.6 * xmax
            ax.plot([last["token"]], [y], marker="X", ms=10, mfc=color, mec="black", mew=0.8, zorder=6)
            ax.annotate(f"failed: {_reason(r.status)}", (last["token"], y), xytext=(-6 if right else 6, 8),
                        textcoords="offset points", fontsize=7.5, color=color, va="bottom",
                        ha="right" if right else "left", zorder=7,
                        bbox={"fc": "white", "ec": "none", "alpha": 0.75, "pad": 0.5})
    scenarios = sorted({r.scenario for r in runs})
    marks = [(tok, f"{scen}: {text}" if len(scenarios) > 1 else text)
             for scen in scenarios for tok, text in scenario_events([r for r in runs if r.scenario == scen])]
    for tok, text in marks:
        ax.axvline(tok - 0.5, color=EVENT_COLOR, ls="--", lw=1.1, zorder=2)
        ax.annotate(text, (tok - 0.5, 1), xycoords=("data", "axes fraction"), xytext=(-3, -4),
                    textcoords="offset points", rotation=90, ha="right", va="top", fontsize=8,
                    color=EVENT_COLOR, zorder=4, bbox={"fc": "white", "ec": "none", "alpha": 0.7, "pad": 1})
    ax.set_ylim(0, top)
    ax.set_xlim(-0.5, xmax + 0.5)
    ax.set_ylabel("latency per token (ms)")
    ax.set_xlabel("token index (decode steps; token 0, the prefill, not drawn)")
    ax.grid(True, axis="y", color="#dddddd", lw=0.6)
    handles, _ = ax.get_legend_handles_labels()
    extra = [Line2D([], [], ls="--", color=EVENT_COLOR, label="scenario event"),
             Line2D([], [], ls="", marker="D", mfc="white", mec="black", label="migration (blocks moved)")]
    if arrows:
        extra.append(Line2D([], [], ls="", marker="^", color="#888888", label="above the axis (value)"))
    if any(not r.ok for r in runs):
        extra.append(Line2D([], [], ls="", marker="X", mfc="white", mec="black", ms=8, label="run failed"))
    ax.legend(handles=handles + extra, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              frameon=False, title="run", title_fontsize=9, alignment="left")


def placement_matrix(run: Run, devices: list[str], ncols: int) -> tuple[list[str], np.ma.MaskedArray]:
    """Blocks in model order and a blocks x tokens array of device indices (masked where
    the run produced no token)."""
    blocks = sorted({b for _, b, _ in run.placements}, key=block_key)
    row = {b: i for i, b in enumerate(blocks)}
    ntok = len(run.tokens)
    m = np.full((len(blocks), max(ncols, 1)), -1, dtype=int)
    changes: dict[int, list[tuple[str, str]]] = {}
    for tok, b, d in run.placements:
        changes.setdefault(tok, []).append((b, d))
    cur = np.full(len(blocks), -1, dtype=int)
    for t in range(min(ntok, m.shape[1])):
        for tk in [k for k in changes if k <= t]:
            for b, d in changes.pop(tk):
                cur[row[b]] = devices.index(d)
        m[:, t] = cur
    return blocks, np.ma.masked_less(m, 0)


def placement_panel(ax: Any, run: Run, title: str, colors: dict[str, Any], ncols: int,
                    events: list[tuple[int, str]]) -> None:
    devices = list(colors)
    blocks, m = placement_matrix(run, devices, ncols)
    ax.set_facecolor("#f2f2f2")
    ax.set_title(title, loc="left", fontsize=9)
    if not blocks:
        ax.text(0.5, 0.5, "no placement recorded", transform=ax.transAxes, ha="center", va="center")
        ax.set_yticks([])
        return
    cmap = ListedColormap([colors[d] for d in devices])
    ax.imshow(m, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5, vmax=len(devices) - 0.5,
              extent=(-0.5, m.shape[1] - 0.5, len(blocks) - 0.5, -0.5))
    layers: dict[int | None, list[int]] = {}
    for i, b in enumerate(blocks):
        layers.setdefault(block_layer(b), []).append(i)
    keys = list(layers)
    step = max(1, math.ceil(len(keys) / 16))
    ticks, names = [], []
    for j, lay in enumerate(keys):
        rows = layers[lay]
        if j > 0:
            ax.axhline(rows[0] - 0.5, color="white", lw=0.9)
        if j % step == 0:
            ticks.append((rows[0] + rows[-1]) / 2)
            names.append(f"layer {lay}" if lay is not None else "other")
    ax.set_yticks(ticks, names, fontsize=7)
    ax.tick_params(axis="y", length=0)
    for tok, _ in events:
        ax.axvline(tok - 0.5, color="black", ls="--", lw=0.9)
    ntok = len(run.tokens)
    if not run.ok and ntok < m.shape[1]:
        ax.text((ntok + m.shape[1]) / 2, len(blocks) / 2, "no tokens (run failed)", ha="center",
                va="center", fontsize=8, color="#777777")
    ax.set_ylabel(f"{len(blocks)} blocks\n(heads, proj, ffn)", fontsize=8)


def make_figure(runs: list[Run], panels: list[Run], title: str | None, ymax: float | None = None) -> Figure:
    names = labels(runs)
    xmax = max((len(r.tokens) for r in runs), default=1) - 1
    ncols = xmax + 1
    nblocks = [len({b for _, b, _ in r.placements}) for r in panels]
    heights = [4.4] + [min(4.8, max(1.5, 0.7 + 0.024 * n)) for n in nblocks]
    fig = plt.figure(figsize=(13, sum(heights) + 0.9), layout="constrained")
    gs = fig.add_gridspec(len(heights), 1, height_ratios=heights)
    ax = fig.add_subplot(gs[0])
    latency_panel(ax, runs, names, xmax, ymax)
    colors = device_colors(runs)
    axes = []
    for i, r in enumerate(panels):
        pax = fig.add_subplot(gs[i + 1], sharex=ax)
        status = "completed" if r.ok else "failed"
        placement_panel(pax, r, f"placement: {names[r.path]} ({status})", colors, ncols,
                        scenario_events([r]))
        pax.tick_params(labelbottom=False)
        axes.append(pax)
    if axes:
        axes[-1].tick_params(labelbottom=True)
        axes[-1].set_xlabel("token index (0 = prefill; an event at token k applies before k)")
        used = [d for d in colors if any(d in r.devices() for r in panels)]
        axes[0].legend(handles=[Patch(color=colors[d], label=d) for d in used], loc="upper left",
                       bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, title="device",
                       title_fontsize=9, alignment="left", ncols=1 if len(used) <= 12 else 2)
    fig.suptitle(title or default_title(runs), fontsize=13, fontweight="bold")
    return fig


def default_title(runs: list[Run]) -> str:
    scen = sorted({r.scenario for r in runs})
    if len(scen) != 1:
        return f"{', '.join(scen)}: per-token latency and placement"
    r = runs[0]
    sd = r.scenario_dict
    model = sd.get("model", {}).get("preset") or sd.get("model", {}).get("name") or ""
    ndev = len(sd.get("devices", []))
    seeds = sorted({x.seed for x in runs})
    bits = [b for b in (model, f"{ndev} devices" if ndev else "",
                        f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(seeds)}",
                        f"{r.clock} clock" if r.clock else "") if b]
    return f"{scen[0]}: per-token latency and placement ({', '.join(bits)})"


def select_panels(runs: list[Run], placement: list[str] | None) -> list[Run]:
    if not placement:
        return list(runs)
    wanted = [a.strip() for p in placement for a in p.split(",") if a.strip()]
    have = sorted({r.algorithm for r in runs})
    for a in wanted:
        if a not in have:
            raise RunsError(f"--placement: no run of algorithm {a!r} (runs have: {', '.join(have)})")
    return [r for r in runs if r.algorithm in wanted]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    out = Console(highlight=False, soft_wrap=True)
    try:
        if args.dpi <= 0:
            raise RunsError(f"--dpi: must be positive, not {args.dpi}")
        if args.ymax is not None and not args.ymax > 0:
            raise RunsError(f"--ymax: must be positive, not {args.ymax}")
        runs = load_runs(args.runs)
        panels = select_panels(runs, args.placement)
        fig = make_figure(runs, panels, args.title, args.ymax)
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(args.output, dpi=args.dpi)
        except (OSError, ValueError) as e:
            raise RunsError(f"{args.output}: cannot write ({e})") from None
        finally:
            plt.close(fig)
    except RunsError as e:
        err.print(f"error: {e}", markup=False)
        return 2
    out.print(f"{len(runs)} run(s) -> {args.output}", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
