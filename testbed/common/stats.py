"""The percentile behind every figure: latency statistics in summary.json and the tools,
the host's share of an emulated window, the analytic sweep's tail latencies.

One convention: linear interpolation between the closest ranks (numpy's default method),
computed in plain Python so that a figure does not depend on numpy's rounding. Pure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(xs: Iterable[float], q: float) -> float:
    """The q-th percentile (q in 0..100) of xs, linearly interpolated; NaN for no samples."""
    s = sorted(xs)
    if not s:
        return math.nan
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
