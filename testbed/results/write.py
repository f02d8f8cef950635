"""Result files of a run: writers and the summary statistics.

Owns the column lists (public contract: columns may be added, never renamed or removed),
the run directory's files, and `summarize`, a pure function of the token rows. CSV rows
are flushed as they are written, so a crash leaves readable partial results; JSON files
are replaced atomically (write to a temporary file, then rename). A `tap` sees every row
and JSON document as it is written (the live view, testbed/webview/, reads the run that way).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..common.stats import percentile

FORMAT_VERSION = 1

TOKENS = ["token", "t_start_s", "latency_ms", "predicted_ms", "stall_ms", "migrations",
          "migrated_bytes", "token_id", "ref_token_id", "phase"]
EVENTS = ["t_s", "token", "kind", "subject", "detail"]
PLACEMENTS = ["token", "block", "device"]
TELEMETRY = ["t_s", "token", "device", "mem_current", "mem_high", "mem_max", "kv_bytes",
             "weights_bytes", "pressure_bytes", "compute_gflops", "mem_peak", "over_high",
             "high_events", "oom_events", "reserved_bytes", "background_bytes"]
LINKS = ["t_s", "token", "src", "dst", "bandwidth_mbps", "measured_mbps", "latency_ms", "bytes"]

FILES = {"tokens.csv": TOKENS, "events.csv": EVENTS, "placements.csv": PLACEMENTS,
         "telemetry.csv": TELEMETRY, "links.csv": LINKS}
# the columns of those files that hold text; every other column is a number (or empty)
TEXT_COLUMNS = frozenset({"kind", "subject", "detail", "phase", "block", "device", "src", "dst"})

# (file name, row or document) after each write; it must only take note (it runs on the
# run's hot path) and must not modify what it is given
Tap = Callable[[str, dict[str, Any]], None]


def _clean(v: Any) -> Any:
    """JSON has no NaN/inf: write null instead."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(_clean(data), f, indent=2, sort_keys=True, default=str, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


class _Csv:
    def __init__(self, path: Path, columns: list[str]) -> None:
        self.columns = columns
        self._f = open(path, "w", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=columns, extrasaction="raise")
        self._w.writeheader()
        self._f.flush()

    def write(self, row: dict[str, Any]) -> None:
        self._w.writerow({k: _fmt(v) for k, v in row.items()})
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.9g}"
    return v


def _missing_dirs(path: Path) -> list[Path]:
    """The directories that creating `path` would create, deepest first."""
    out = []
    while path != path.parent:
        try:
            if path.exists():
                break
        except OSError:  # a name the file system refuses: it does not exist either
            pass
        out.append(path)
        path = path.parent
    return out


class RunWriter:
    """Owns one run directory. The directory must not exist yet (runs never overwrite)."""

    def __init__(self, run_dir: Path, tap: Tap | None = None) -> None:
        self.dir = Path(run_dir)
        made = _missing_dirs(self.dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=False)
            self._csv = {name: _Csv(self.dir / name, cols) for name, cols in FILES.items()}
        except OSError:  # e.g. a name too long for the file system: leave nothing behind
            if self.dir in made:
                shutil.rmtree(self.dir, ignore_errors=True)
            for d in made:
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
        self.token_rows: list[dict[str, Any]] = []
        self.event_rows: list[dict[str, Any]] = []
        self.tap = tap

    def _row(self, name: str, row: dict[str, Any]) -> None:
        self._csv[name].write(row)
        if self.tap is not None:
            self.tap(name, row)

    def token(self, row: dict[str, Any]) -> None:
        self.token_rows.append(row)
        self._row("tokens.csv", row)

    def event(self, t_s: float, token: int, kind: str, subject: str, detail: str) -> None:
        row = {"t_s": round(t_s, 9), "token": token, "kind": kind, "subject": subject, "detail": detail}
        self.event_rows.append(row)
        self._row("events.csv", row)

    def placement(self, token: int, changes: Sequence[tuple[str, str]]) -> None:
        for block, device in changes:
            self._row("placements.csv", {"token": token, "block": block, "device": device})

    def telemetry(self, row: dict[str, Any]) -> None:
        self._row("telemetry.csv", row)

    def link(self, row: dict[str, Any]) -> None:
        self._row("links.csv", row)

    def meta(self, meta: dict[str, Any]) -> None:
        write_json(self.dir / "meta.json", meta)
        if self.tap is not None:  # a copy: the caller updates its dict and writes it again
            self.tap("meta.json", dict(meta))

    def summary(self, summary: dict[str, Any]) -> None:
        write_json(self.dir / "summary.json", summary)
        if self.tap is not None:
            self.tap("summary.json", summary)

    def close(self) -> None:
        for c in self._csv.values():
            c.close()


# ---------------------------------------------------------------------------- statistics


def latency_stats(xs: Sequence[float]) -> dict[str, float]:
    if not xs:
        return {k: math.nan for k in ("mean", "p50", "p95", "p99", "max")}
    return {"mean": sum(xs) / len(xs), "p50": percentile(xs, 50), "p95": percentile(xs, 95),
            "p99": percentile(xs, 99), "max": max(xs)}


def decode_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-token statistics cover decode steps; the prefill (token 0) is reported apart."""
    return [r for r in rows if r.get("phase", "decode") == "decode"]


def windows(rows: Sequence[dict[str, Any]], cuts: Sequence[int]) -> list[dict[str, Any]]:
    """Latency of decode tokens between consecutive cut points (scenario event tokens)."""
    dec = decode_rows(rows)
    if not dec:
        return []
    edges = sorted({c for c in cuts if 0 < c <= dec[-1]["token"]})
    bounds = [dec[0]["token"], *edges, dec[-1]["token"] + 1]
    out = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        xs = [float(r["latency_ms"]) for r in dec if lo <= int(r["token"]) < hi]
        if xs:
            out.append({"from_token": lo, "to_token": hi - 1, "tokens": len(xs), **latency_stats(xs)})
    return out


def migration_detail(log: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per migration (a controller's record: its first token, the token it switched at),
    what the tokens it touched (from its start to its switch) paid: `extra_latency_ms`, the
    sum of their latency beyond the estimate of their placement (its stall and the
    interference of its stages with inference)."""
    out = []
    for m in log:
        touched = [r for r in rows if m["first_token"] <= int(r["token"]) <= m["switch_token"]
                   and r["predicted_ms"] == r["predicted_ms"]]
        extra = sum(float(r["latency_ms"]) - float(r["predicted_ms"]) for r in touched)
        out.append({**m, "tokens_touched": len(touched), "extra_latency_ms": round(extra, 6)})
    return out


def summarize(rows: Sequence[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    dec = decode_rows(rows)
    lat = [float(r["latency_ms"]) for r in dec]
    pre = [r for r in rows if r.get("phase") == "prefill"]
    out: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "tokens": len(rows),
        "latency_ms": latency_stats(lat),
        "prefill_ms": float(pre[0]["latency_ms"]) if pre else math.nan,
        "predicted_ms": latency_stats([float(r["predicted_ms"]) for r in dec if r["predicted_ms"] == r["predicted_ms"]]),
        "stall_ms": sum(float(r["stall_ms"]) for r in rows),
        # the stall of the tokens that moved blocks: what migrating cost (testbed/twin.py)
        "migration_stall_ms": sum(float(r["stall_ms"]) for r in rows if int(r["migrations"])),
        "migrations": sum(int(r["migrations"]) for r in rows),
        "migrated_bytes": sum(int(r["migrated_bytes"]) for r in rows),
    }
    out.update(extra)
    return out
