"""A real-clock run against its virtual-clock twin (same scenario, seed and algorithm).

The virtual clock gives the emulated system's own answer, free of the host; a real-clock run
is faithful when it reproduces it: the same tokens, per-token latency close to the twin's
(mean within 5 %, 95th percentile within 10 %), the controller's decisions alike
(migrations within 10 %, and the stall of the tokens that migrated within 10 %), and few
jobs or deliveries that overran their emulated windows (at most 1 %). Pure: takes two
`summary.json` documents, returns the comparison. Used by `tools.bench.realtime` and the
tests.

`same_decisions` is the stricter check of the decisions alone: the same re-plans (token,
reason, moves), the same blocks moved between the same devices at the same tokens, and the
stall of every token that moved blocks within 2 % of the twin's. It takes the rows of
`events.csv` and `tokens.csv` of both runs.
"""

from __future__ import annotations

import math
from typing import Any

MEAN_TOLERANCE = 0.05
P95_TOLERANCE = 0.10
MIGRATION_TOLERANCE = 0.10
STALL_TOLERANCE = 0.10  # on `migration_stall_ms`; the whole stall also holds each
# re-plan's host time on the real clock, which the virtual clock does not count
OVERRUN_LIMIT = 0.01


def _rel(a: float, b: float) -> float:
    return a / b - 1.0 if b else (0.0 if a == b else math.inf)


def compare(real: dict[str, Any], virtual: dict[str, Any]) -> dict[str, Any]:
    """How far `real` is from `virtual`, and whether that is within the tolerances above;
    `problems` says what is not."""
    rl, vl = real["latency_ms"], virtual["latency_ms"]
    out: dict[str, Any] = {
        "mean_ms": rl["mean"], "twin_mean_ms": vl["mean"], "mean_error": _rel(rl["mean"], vl["mean"]),
        "p95_ms": rl["p95"], "twin_p95_ms": vl["p95"], "p95_error": _rel(rl["p95"], vl["p95"]),
        "migrations": real["migrations"], "twin_migrations": virtual["migrations"],
        "migration_stall_ms": real.get("migration_stall_ms"),
        "twin_migration_stall_ms": virtual.get("migration_stall_ms"),
        "overrun_fraction": real["overrun_fraction"],
        "late_delivery_fraction": real.get("late_delivery_fraction", 0.0),
        "tokens_match": bool(real["correctness"]["tokens_match"]),
        "time_scale": real.get("time_scale"), "wall_s": real.get("wall_s"),
    }
    problems = []
    if real.get("status") != "completed":
        problems.append(f"status {real.get('status')}")
    if not out["tokens_match"]:
        problems.append("tokens differ from the reference")
    if not abs(out["mean_error"]) <= MEAN_TOLERANCE:
        problems.append(f"mean latency {out['mean_error']:+.1%} off the twin's")
    if not abs(out["p95_error"]) <= P95_TOLERANCE:
        problems.append(f"p95 latency {out['p95_error']:+.1%} off the twin's")
    m, vm = out["migrations"], out["twin_migrations"]
    if abs(m - vm) > MIGRATION_TOLERANCE * vm and m != vm:
        problems.append(f"{m} migrations against the twin's {vm}")
    s, vs = out["migration_stall_ms"], out["twin_migration_stall_ms"]
    if s is not None and vs is not None and abs(s - vs) > STALL_TOLERANCE * vs and s != vs:
        problems.append(f"migration stall {s:.1f} ms against the twin's {vs:.1f} ms")
    if out["overrun_fraction"] > OVERRUN_LIMIT:
        problems.append(f"{out['overrun_fraction']:.1%} of jobs overran")
    out["problems"] = problems
    out["faithful"] = not problems
    return out


DECISION_STALL_TOLERANCE = 0.02  # per token that moved blocks


def _kv(detail: str) -> dict[str, str]:
    return dict(p.partition("=")[::2] for p in str(detail).split() if "=" in p)


def decisions(events: list[dict[str, Any]], tokens: list[dict[str, Any]]) -> dict[str, Any]:
    """A run's decisions from its rows: re-plans as (token, reason, moves), migrations as
    (token, block, from, to) in a fixed order, and the stall (ms) of each token that
    moved blocks."""
    replans = [(int(e["token"]), _kv(e["detail"]).get("reason", ""), int(_kv(e["detail"]).get("moves", -1)))
               for e in events if e["kind"] == "replan"]
    moved = sorted((int(e["token"]), str(e["subject"]), _kv(e["detail"]).get("from", ""), _kv(e["detail"]).get("to", ""))
                   for e in events if e["kind"] == "migration")
    stall = {int(t["token"]): float(t["stall_ms"]) for t in tokens if int(t.get("migrations") or 0) > 0}
    return {"replans": replans, "moved": moved, "stall_ms": stall}


def same_decisions(real: dict[str, Any], virtual: dict[str, Any]) -> dict[str, Any]:
    """Whether `real` (a `decisions` result) made exactly the decisions of `virtual`;
    `problems` says where they differ first."""
    problems = []
    if real["replans"] != virtual["replans"]:
        diff = next(((a, b) for a, b in zip(real["replans"], virtual["replans"], strict=False) if a != b),
                    (real["replans"][len(virtual["replans"]):][:1], virtual["replans"][len(real["replans"]):][:1]))
        problems.append(f"re-plans differ: {diff[0]} against the twin's {diff[1]} "
                        f"({len(real['replans'])} against {len(virtual['replans'])})")
    if real["moved"] != virtual["moved"]:
        only, twin_only = set(real["moved"]) - set(virtual["moved"]), set(virtual["moved"]) - set(real["moved"])
        problems.append(f"moved blocks differ: {sorted(only)[:3]} against the twin's {sorted(twin_only)[:3]}")
    worst = 0.0
    for k in sorted(set(real["stall_ms"]) | set(virtual["stall_ms"])):
        s, vs = real["stall_ms"].get(k), virtual["stall_ms"].get(k)
        if s is None or vs is None:
            problems.append(f"token {k} moved blocks in one run only")
            continue
        err = abs(_rel(s, vs))
        worst = max(worst, err)
        if err > DECISION_STALL_TOLERANCE:
            problems.append(f"token {k}: stall {s:.2f} ms against the twin's {vs:.2f} ms")
    return {"same": not problems, "problems": problems, "worst_stall_error": worst,
            "replans": len(real["replans"]), "moved": len(real["moved"])}
