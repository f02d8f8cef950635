"""Pre-copy against stop-and-copy migration, on the virtual clock (deterministic).

`python -m tools.bench.migration [--scenarios A.yaml,B.yaml] [--figure] [--out DIR]`

Runs each scenario twice with its own algorithm, once per `controller.migration`, and prints
one row per run: migrations, the stall per migration (summary.json's migration_stall_ms, the
stall of the tokens that switched blocks, over the migrations), the mean per-token latency
after the first event (stalls and interference included; every decode token when the
scenario has no event), and whether the tokens equal the reference. The default scenarios
are the three of docs/architecture.md#migration. `--figure` runs scenarios/link_flap.yaml
(768 tokens; the heads move again every 128 tokens) and writes, under `--out` (default
results/reference/precopy), `link_flap.csv` (per switching token: cache positions, migrations, stall
per migration, per mechanism) and `link_flap.png`: stop-and-copy's stall grows with the
cache, pre-copy's stays flat. Runs go to a temporary directory.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from testbed import scenario as sc
from testbed.experiments import run as experiment
from testbed.results.read import read_json

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ("scenarios/bandwidth_drop.yaml", "scenarios/kv_growth.yaml", "scenarios/smollm2_bandwidth_drop.yaml")
MECHANISMS = ("stop_and_copy", "pre_copy")
FIGURE = "scenarios/link_flap.yaml"


@dataclass(frozen=True)
class Row:
    scenario: str
    mechanism: str
    migrations: int
    stall_per_migration_ms: float
    mean_after_ms: float
    tokens_match: bool
    run_dir: Path

    def cells(self) -> list[str]:
        return [self.scenario, self.mechanism, str(self.migrations), f"{self.stall_per_migration_ms:.3f}",
                f"{self.mean_after_ms:.3f}", "yes" if self.tokens_match else "NO"]


def run_one(path: str, mechanism: str, out: Path) -> Row:
    scen = sc.load(ROOT / path)
    scen = replace(scen, controller=replace(scen.controller, migration=mechanism))
    prep = experiment.prepare(scen)
    o = experiment.run(prep, scen.controller.algorithm, out / f"{scen.name}-{mechanism}", clock="virtual")
    summary = read_json(o.run_dir / "summary.json") or {}
    with open(o.run_dir / "tokens.csv", newline="") as f:
        tokens = list(csv.DictReader(f))
    cuts = [e.at_token for e in scen.events if e.at_token is not None]
    first = min(cuts) if cuts else 1
    after = [float(t["latency_ms"]) for t in tokens if t["phase"] == "decode" and int(t["token"]) >= first]
    n = int(summary.get("migrations", 0))
    return Row(scen.name, mechanism, n, float(summary.get("migration_stall_ms", 0.0)) / n if n else 0.0,
               sum(after) / len(after) if after else float("nan"),
               bool(summary.get("correctness", {}).get("tokens_match")), o.run_dir)


def table(rows: list[Row]) -> str:
    head = ["scenario", "migration", "migrations", "stall per migration (ms)", "mean latency after the event (ms)",
            "reference tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    lines.append("")
    by = {(r.scenario, r.mechanism): r for r in rows}
    for name in dict.fromkeys(r.scenario for r in rows):
        s, p = by.get((name, "stop_and_copy")), by.get((name, "pre_copy"))
        if s and p and p.stall_per_migration_ms > 0:
            lines.append(f"- {name}: stall per migration {s.stall_per_migration_ms / p.stall_per_migration_ms:.1f}x "
                         f"lower with pre_copy; mean latency after the event {p.mean_after_ms - s.mean_after_ms:+.3f} ms")
    return "\n".join(lines)


def switches(run_dir: Path, prompt: int) -> list[dict[str, Any]]:
    """Per token that switched blocks: cache positions, migrations, stall per migration."""
    with open(run_dir / "tokens.csv", newline="") as f:
        return [{"token": int(t["token"]), "positions": prompt + int(t["token"]) - 1, "migrations": int(t["migrations"]),
                 "stall_per_migration_ms": round(float(t["stall_ms"]) / int(t["migrations"]), 6)}
                for t in csv.DictReader(f) if int(t["migrations"]) > 0]


def figure_rows(runs: Path) -> tuple[list[dict[str, Any]], list[Row]]:
    """The figure's points (the rows of link_flap.csv) and the two runs' rows."""
    prompt = sc.load(ROOT / FIGURE).generation.prompt_tokens  # seeded random tokens: its exact length
    points: list[dict[str, Any]] = []
    rows = []
    for mech in MECHANISMS:
        r = run_one(FIGURE, mech, runs)
        rows.append(r)
        points += [{"mechanism": mech, **p} for p in switches(r.run_dir, prompt)]
    return points, rows


def figure(out: Path, runs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, runs_ = figure_rows(runs)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for mech, mark in zip(MECHANISMS, ("o-", "s-"), strict=True):
        pts = [p for p in rows if p["mechanism"] == mech]
        ax.plot([p["positions"] for p in pts], [p["stall_per_migration_ms"] for p in pts], mark, label=mech)
    print(table(runs_))
    ax.set_xlabel("cache positions at the switch")
    ax.set_ylabel("stall per migration (ms)")
    ax.set_title("link_flap.yaml (virtual clock): stall per migration against the cache")
    ax.legend()
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "link_flap.png", dpi=100)
    with open(out / "link_flap.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["mechanism", "token", "positions", "migrations", "stall_per_migration_ms"])
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out / 'link_flap.csv'} and {out / 'link_flap.png'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated scenario files")
    ap.add_argument("--figure", action="store_true", help="run scenarios/link_flap.yaml and write its figure")
    ap.add_argument("--out", default="results/reference/precopy", help="where --figure writes (default results/reference/precopy)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-migration-") as tmp:
        if args.figure:
            figure(ROOT / args.out, Path(tmp))
            return 0
        rows = [run_one(p, m, Path(tmp)) for p in args.scenarios.split(",") for m in MECHANISMS]
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
