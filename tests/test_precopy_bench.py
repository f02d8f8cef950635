"""The pre-copy benchmark's committed figure (results/reference/precopy/link_flap.csv, drawn in
link_flap.png) is current, and says what docs/architecture.md#migration says of it."""

from __future__ import annotations

import csv
from pathlib import Path

from tools.bench import migration as bench

ROOT = Path(__file__).resolve().parents[1]


def test_the_link_flap_figure_is_current_and_shows_the_stall_against_the_cache(tmp_path: Path) -> None:
    points, (stop, pre) = bench.figure_rows(tmp_path)
    with open(ROOT / "results" / "reference" / "precopy" / "link_flap.csv", newline="") as f:
        committed = list(csv.DictReader(f))
    assert [{k: str(v) for k, v in p.items()} for p in points] == committed, \
        "regenerate with python -m tools.bench.migration --figure"
    assert stop.tokens_match and pre.tokens_match
    # stop-and-copy's single-head moves stall longer the longer the cache; pre-copy's
    # switches stay under 2 ms per migration at every length, far below any of them
    single = [(p["positions"], p["stall_per_migration_ms"]) for p in points
              if p["mechanism"] == "stop_and_copy" and p["migrations"] == 1]
    assert len(single) >= 4 and max(n for n, _ in single) >= 512
    assert all(a[1] < b[1] for a, b in zip(single, single[1:], strict=False))
    flat = [p["stall_per_migration_ms"] for p in points if p["mechanism"] == "pre_copy"]
    assert len(flat) >= 4 and max(flat) < 2.0 and 5 * max(flat) < min(s for _, s in single)
    # and, as the documentation says, pre-copy's mean latency is higher on this scenario
    assert pre.mean_after_ms > stop.mean_after_ms
