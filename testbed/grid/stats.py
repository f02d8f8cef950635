"""The figures of a grid's runs and their statistics.

Owns `FIGURES` (what a row of runs.csv reports of a run, read from its summary.json: the
per-token latency's mean and percentiles, the mean after the scenario's first event, the
stall, migrations, ...), `figures(summary, cut)` and `summarize(values)`: the mean, the
sample standard deviation and the 95 % confidence interval of the mean (Student's t with
n - 1 degrees of freedom; no interval for n < 2). Pure: the standard library and scipy's
t distribution.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from scipy.stats import t as student_t

CONFIDENCE = 0.95


def _path(*keys: str) -> Callable[[Mapping[str, Any], int | None], float | None]:
    def get(s: Mapping[str, Any], cut: int | None) -> float | None:
        v: Any = s
        for k in keys:
            if not isinstance(v, Mapping) or k not in v:
                return None
            v = v[k]
        return None if v is None or isinstance(v, bool) else v

    return get


def _after_event(s: Mapping[str, Any], cut: int | None) -> float | None:
    """The mean per-token latency from the scenario's first event on (the windows that
    start at or after it, weighted by their tokens); the whole run's mean without one."""
    if cut is None:
        return _path("latency_ms", "mean")(s, cut)
    after = [w for w in s.get("windows", []) if w.get("from_token", -1) >= cut and w.get("tokens")]
    n = sum(w["tokens"] for w in after)
    return sum(w["mean"] * w["tokens"] for w in after) / n if n else None


def _mib(s: Mapping[str, Any], cut: int | None) -> float | None:
    b = s.get("migrated_bytes")
    return None if b is None else b / 2**20


# name -> (how it is read from summary.json, what it is: the figure's axis label)
FIGURES: dict[str, tuple[Callable[[Mapping[str, Any], int | None], float | None], str]] = {
    "latency_mean_ms": (_path("latency_ms", "mean"), "mean per-token latency (ms)"),
    "latency_p50_ms": (_path("latency_ms", "p50"), "median per-token latency (ms)"),
    "latency_p95_ms": (_path("latency_ms", "p95"), "95th percentile per-token latency (ms)"),
    "latency_max_ms": (_path("latency_ms", "max"), "largest per-token latency (ms)"),
    "after_event_mean_ms": (_after_event, "mean per-token latency from the first event on (ms)"),
    "prefill_ms": (_path("prefill_ms"), "prefill (ms)"),
    "stall_ms": (_path("stall_ms"), "time stalled re-planning, migrating, recovering (ms)"),
    "migrations": (_path("migrations"), "blocks migrated"),
    "migrated_mib": (_mib, "data migrated (MiB)"),
    "replans": (_path("replans"), "re-plans"),
    "oom": (_path("oom"), "out-of-memory refusals"),
    "emulated_s": (_path("emulated_s"), "emulated time of the run (s)"),
}


def figures(summary: Mapping[str, Any], cut: int | None) -> dict[str, float | None]:
    """Every figure of one run (None where its summary has none: a failed run's)."""
    return {name: get(summary, cut) for name, (get, _) in FIGURES.items()}


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean, sd (n - 1) and the 95 % confidence interval of the mean of `values`."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci95_low": None, "ci95_high": None}
    mean = statistics.fmean(values)
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "ci95_low": None, "ci95_high": None}
    sd = statistics.stdev(values)
    half = float(student_t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95_low": mean - half, "ci95_high": mean + half}
