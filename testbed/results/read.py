"""Finding and reading run directories, shared by the analysis tools.

A run directory is any directory holding `tokens.csv` and `meta.json`. `find_runs` accepts
run directories or any directory above them; `Run` reads one lazily and gives typed rows;
`run_stats` computes a run's statistics from its CSV rows (never from summary.json, so a
run that failed part-way, or crashed before writing its summary, is summarised the same
way), with `testbed.results.write`' statistics. `RunsError` carries a one-line message for the
command lines (exit status 2).

Run directories get shared, downloaded and attached to bug reports, so their files are
read defensively (`read_text`): a regular file inside the run directory only (a symlink out
of it, a FIFO or a device is refused without being read), at most `MAX_JSON_BYTES` /
`MAX_CSV_BYTES`, UTF-8, and every number column of the known result files a number (`inf`
included), else one line naming the file, row and column.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ..common.files import FileRefused, read_limited, utf8
from .write import FILES, TEXT_COLUMNS, TOKENS, summarize, windows

RUN_FILES = ("tokens.csv", "meta.json")

# events.csv kinds that are scenario events (the rest are the controller's and the agents')
SCENARIO_KINDS = ("set_link", "set_compute", "memory_pressure", "memory_release", "fail_device",
                  "join_device")

# tokens.csv columns read as numbers (the rest stay strings)
_INT_COLS = {"token", "migrations", "migrated_bytes", "token_id", "ref_token_id"}
_FLOAT_COLS = {"t_start_s", "latency_ms", "predicted_ms", "stall_ms"}

_KIND_ORDER = {"head": 0, "proj": 1, "ffn": 2}

# the largest result files read (a 100k-token run's tokens.csv is about 10 MB)
MAX_JSON_BYTES = 16 << 20
MAX_CSV_BYTES = 512 << 20
# columns of the known result files that must hold numbers (empty: NaN), and the integer ones
NUMBER_COLUMNS = {name: frozenset(c for c in cols if c not in TEXT_COLUMNS) for name, cols in FILES.items()}
INT_COLUMNS = frozenset(_INT_COLS | {"token"})
# columns the tools index by name: a result file without them is refused
REQUIRED_COLUMNS = {"tokens.csv": tuple(c for c in TOKENS if c != "phase"),  # summarize's (phase: derived)
                    "events.csv": ("token", "kind"),
                    "placements.csv": ("token", "block", "device"), "telemetry.csv": ("token", "device"),
                    "links.csv": ("token", "src", "dst")}

# the summary row of a run, in this order (latency_* over decode tokens, prefill apart)
STAT_COLUMNS = ["tokens", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "latency_mean_ms",
                "latency_max_ms", "prefill_ms", "stall_ms", "migrations", "migrated_bytes", "oom",
                "replans", "tokens_match"]
TAG_COLUMNS = ["scenario", "algorithm", "seed", "clock"]


class RunsError(Exception):
    """Bad input for the tools: the message is one line, ready for stderr."""


# ---------------------------------------------------------------------------- finding


def is_run_dir(path: Path) -> bool:
    return all((path / f).is_file() for f in RUN_FILES)


def add_runs_argument(p: argparse.ArgumentParser) -> None:
    """The analysis tools' one positional argument: what `find_runs` accepts."""
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run directories, or directories above them (searched recursively)")


def find_runs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every run directory at or beneath the given paths, each once, sorted by path.

    RunsError for a path that does not exist or holds no run."""
    found: dict[Path, Path] = {}
    for p in paths:
        root = Path(p)
        if not root.exists():
            raise RunsError(f"{root}: no such file or directory")
        if not root.is_dir():
            raise RunsError(f"{root}: not a directory (give a run directory or a directory above runs)")
        hits = [root] if is_run_dir(root) else [
            Path(d) for d, _, files in os.walk(root) if all(f in files for f in RUN_FILES)]
        if not hits:
            raise RunsError(f"{root}: no run directory (with tokens.csv and meta.json) in it or beneath it")
        for h in hits:
            found.setdefault(h.resolve(), h)
    return sorted(found.values(), key=str)


def load_runs(paths: Iterable[str | os.PathLike]) -> list[Run]:
    """find_runs + read each meta.json (RunsError if one is unreadable), sorted by
    scenario, algorithm, seed, clock, then directory."""
    runs = [Run(p) for p in find_runs(paths)]
    for r in runs:
        r.meta  # noqa: B018  (read now: a broken meta.json is bad input, reported up front)
    return sorted(runs, key=Run.sort_key)


# ---------------------------------------------------------------------------- reading


def read_text(path: Path, limit: int) -> str | None:
    """The text of a file of a run directory (`path.parent`); None if there is none.
    RunsError, without reading, for a link that leads out of the directory, anything but a
    regular file (opened with O_NONBLOCK, so a FIFO never blocks, and checked on the open
    descriptor) and a file over `limit` bytes; RunsError for bytes that are not UTF-8."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RunsError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        real, root = path.resolve(strict=True), path.parent.resolve(strict=True)
    except FileNotFoundError:
        raise RunsError(f"{path}: a link to nothing") from None
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        raise RunsError(f"{path}: symlink loop") from None
    if root not in real.parents:
        raise RunsError(f"{path}: a link to {real}, outside the run directory (refused)")
    try:
        return utf8(read_limited(real, limit, "this file"))
    except FileRefused as e:
        raise RunsError(f"{path}: {e}") from None


def read_json(path: Path) -> Any:
    """A JSON document of a run directory (read_text's checks); None if there is none."""
    text = read_text(path, MAX_JSON_BYTES)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        raise RunsError(f"{path}: not JSON ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise RunsError(f"{path}: not JSON (nested too deeply)") from None


def _check_number(path: Path, line: int, column: str, value: str) -> None:
    if value == "":
        return
    try:
        if column in INT_COLUMNS:
            int(value)
        else:
            float(value)
    except ValueError:
        shown = repr(value if len(value) <= 40 else value[:40] + "...")
        kind = "an integer" if column in INT_COLUMNS else "a number"
        raise RunsError(f"{path}: row {line}, column {column!r}: {shown} is not {kind}") from None


def one_line(text: str, limit: int = 80) -> str:
    """`text` shown in one line of at most `limit` characters."""
    s = repr(text)[1:-1]
    return s if len(s) <= limit else s[:limit - 3] + "..."


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV file of a run directory; ([], []) if it is missing. A row
    cut short (a run killed mid-write) is dropped. RunsError (read_text's checks, a broken
    row, a field over the csv module's limit of 128 KiB, or a cell of a number column that
    is not a number) names the file, and the row (its line) and column."""
    text = read_text(path, MAX_CSV_BYTES)
    if text is None:
        return [], []
    numbers = NUMBER_COLUMNS.get(path.name, frozenset())
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS.get(path.name, ()) if c not in header]
        if header and missing:
            raise RunsError(f"{path}: row 1: no column {missing[0]!r} (its header: {one_line(','.join(header))})")
        for r in reader:
            if None in r.values() or None in r:
                continue
            for c in numbers & r.keys():
                _check_number(path, reader.line_num, c, r[c])
            rows.append(r)
    except csv.Error as e:
        raise RunsError(f"{path}: row {reader.line_num}: {e}") from None
    return list(reader.fieldnames or []), rows


def num(s: str | None) -> float:
    """A CSV number; NaN for an empty cell (how the writer spells NaN)."""
    if s is None or s == "":
        return math.nan
    return float(s)


def fmt(v: Any) -> str:
    """A value for a CSV cell: floats with 9 significant digits, NaN as empty, bools as 0/1."""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.9g}"
    return "" if v is None else str(v)


def block_key(name: str) -> tuple:
    """Model order: per layer its heads (by group), proj, ffn; unknown names last."""
    parts = name.split(".")
    try:
        if parts[0] in _KIND_ORDER:
            return (0, int(parts[1]), _KIND_ORDER[parts[0]], int(parts[2]) if len(parts) > 2 else 0, name)
    except (IndexError, ValueError):
        pass
    return (1, 0, 0, 0, name)


def block_layer(name: str) -> int | None:
    k = block_key(name)
    return k[1] if k[0] == 0 else None


@dataclass
class Run:
    """One run directory; files are read on first use."""

    path: Path

    @cached_property
    def meta(self) -> dict[str, Any]:
        data = read_json(self.path / "meta.json")
        if not isinstance(data, dict):
            raise RunsError(f"{self.path / 'meta.json'}: not a JSON object")
        return data

    @cached_property
    def summary(self) -> dict[str, Any] | None:
        """summary.json, or None if the run has none (a crashed run) or half of one."""
        try:
            data = read_json(self.path / "summary.json")
        except RunsError as e:
            if str(e).startswith(f"{self.path / 'summary.json'}: not JSON"):
                return None  # cut short by a crash: the page says so from meta.json
            raise
        return data if isinstance(data, dict) else None

    @property
    def scenario_dict(self) -> dict[str, Any]:
        s = self.meta.get("scenario")
        return s if isinstance(s, dict) else {}

    @property
    def scenario(self) -> str:
        return str(self.scenario_dict.get("name") or self.meta.get("scenario_file") or "?")

    @property
    def algorithm(self) -> str:
        return str(self.meta.get("algorithm", "?"))

    @property
    def seed(self) -> str:
        return str(self.meta.get("seed", self.scenario_dict.get("seed", "")))

    @property
    def clock(self) -> str:
        return str(self.meta.get("clock", ""))

    @property
    def status(self) -> str:
        return str(self.meta.get("status", "unknown"))

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    @property
    def new_tokens(self) -> int | None:
        n = self.scenario_dict.get("generation", {}).get("new_tokens")
        return int(n) if isinstance(n, int) else None

    def sort_key(self) -> tuple:
        seed = int(self.seed) if self.seed.lstrip("-").isdigit() else 0
        return (self.scenario, self.algorithm, seed, self.seed, self.clock, str(self.path))

    def tags(self) -> dict[str, str]:
        return {"scenario": self.scenario, "algorithm": self.algorithm, "seed": self.seed,
                "clock": self.clock}

    # -- raw files

    @cached_property
    def token_file(self) -> tuple[list[str], list[dict[str, str]]]:
        return read_csv(self.path / "tokens.csv")

    @cached_property
    def events(self) -> list[dict[str, Any]]:
        out = []
        for r in read_csv(self.path / "events.csv")[1]:
            try:
                token = int(r["token"])
            except (KeyError, ValueError):
                continue
            out.append({**r, "token": token, "t_s": num(r.get("t_s"))})
        return out

    @cached_property
    def placements(self) -> list[tuple[int, str, str]]:
        """(token, block, device) rows: the initial placement at token 0 and every change."""
        out = []
        for r in read_csv(self.path / "placements.csv")[1]:
            try:
                out.append((int(r["token"]), r["block"], r["device"]))
            except (KeyError, ValueError):
                continue
        return out

    # -- typed views

    @cached_property
    def tokens(self) -> list[dict[str, Any]]:
        """tokens.csv rows with numbers parsed; `phase` filled in for files without it
        (token 0 is the prefill)."""
        out = []
        for r in self.token_file[1]:
            try:
                row: dict[str, Any] = dict(r)
                for c in _INT_COLS & r.keys():
                    row[c] = int(r[c]) if r[c] != "" else -1
                for c in _FLOAT_COLS & r.keys():
                    row[c] = num(r[c])
            except ValueError:
                continue
            row.setdefault("phase", "prefill" if row.get("token") == 0 else "decode")
            out.append(row)
        return out

    @property
    def decode(self) -> list[dict[str, Any]]:
        return [r for r in self.tokens if r.get("phase") == "decode"]

    def scenario_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("kind") in SCENARIO_KINDS]

    def event_tokens(self) -> list[int]:
        """Tokens before which a scenario event applied: from events.csv, and from the
        scenario in meta.json for events the run did not reach (or timed events' tokens)."""
        cuts = {e["token"] for e in self.scenario_events()}
        for e in self.scenario_dict.get("events", []) or []:
            if isinstance(e, dict) and isinstance(e.get("at_token"), int):
                cuts.add(e["at_token"])
        return sorted(cuts)

    def devices(self) -> list[str]:
        """Device names: the scenario's, then any others seen in placements (joined)."""
        names = [str(d.get("name")) for d in self.scenario_dict.get("devices", []) if isinstance(d, dict)]
        for _, _, dev in self.placements:
            if dev not in names:
                names.append(dev)
        return names


# ---------------------------------------------------------------------------- events


def _kv(detail: str) -> dict[str, str]:
    out = {}
    for part in str(detail).split():
        k, eq, v = part.partition("=")
        if eq:
            out[k] = v
    return out


def event_label(e: dict[str, Any]) -> str:
    kind, subject, d = e.get("kind", ""), e.get("subject", ""), _kv(e.get("detail", ""))
    if kind == "set_link" and "bandwidth_mbps" in d:
        return f"link {subject}: {d['bandwidth_mbps']} Mbit/s, {d.get('latency_ms', '?')} ms"
    if kind == "set_compute" and "factor" in d:
        return f"{subject}: compute x{d['factor']}"
    if kind == "memory_pressure" and "took_mib" in d:
        return f"{subject}: co-tenant takes {d['took_mib']} MiB"
    if kind == "memory_release":
        return f"{subject}: co-tenant frees {d.get('released_mib', '?')} MiB"
    if kind == "fail_device":
        return f"{subject} fails"
    if kind == "join_device":
        return f"{subject} joins"
    return f"{kind} {subject}".strip()


def scenario_events(runs: Sequence[Run]) -> list[tuple[int, str]]:
    """(token, label) of the scenario events of all runs, each once, in token order."""
    seen: dict[tuple[int, str], None] = {}
    for r in runs:
        for e in r.scenario_events():
            seen.setdefault((e["token"], event_label(e)), None)
    return sorted(seen)


# ---------------------------------------------------------------------------- statistics


def run_stats(run: Run) -> dict[str, Any]:
    """A run's summary from its CSV rows, keyed by STAT_COLUMNS."""
    rows = run.tokens
    s = summarize(rows)
    lat = s["latency_ms"]
    kinds = [e.get("kind") for e in run.events]
    n = run.new_tokens
    match = (bool(rows) and all(r.get("token_id") == r.get("ref_token_id") and r.get("token_id", -1) >= 0
                                for r in rows)
             and (n is None or len(rows) == n))
    return {
        "tokens": s["tokens"],
        "latency_p50_ms": lat["p50"], "latency_p95_ms": lat["p95"], "latency_p99_ms": lat["p99"],
        "latency_mean_ms": lat["mean"], "latency_max_ms": lat["max"],
        "prefill_ms": s["prefill_ms"], "stall_ms": s["stall_ms"], "migrations": s["migrations"],
        "migrated_bytes": s["migrated_bytes"], "oom": kinds.count("oom"),
        "replans": kinds.count("replan"), "tokens_match": match,
    }


def run_windows(run: Run, cuts: Sequence[int]) -> list[dict[str, Any]]:
    """Decode latency between consecutive cut tokens (testbed.results.write.windows)."""
    return windows(run.tokens, cuts)


def token_columns(runs: Sequence[Run]) -> list[str]:
    """Every tokens.csv column of the runs: the known ones in their order, then others as
    first seen."""
    cols = list(TOKENS)
    for r in runs:
        for c in r.token_file[0]:
            if c not in cols:
                cols.append(c)
    present = {c for r in runs for c in r.token_file[0]}
    return [c for c in cols if c in present] or list(TOKENS)


def labels(runs: Sequence[Run]) -> dict[Path, str]:
    """A short label per run: the algorithm, with the seed if the runs have several seeds,
    the scenario if several scenarios, and the directory name for otherwise identical runs."""
    many_seeds = len({r.seed for r in runs}) > 1
    many_scen = len({r.scenario for r in runs}) > 1
    many_clocks = len({r.clock for r in runs}) > 1
    base: dict[Path, str] = {}
    for r in runs:
        s = r.algorithm
        if many_seeds:
            s += f" s{r.seed}"
        if many_clocks:
            s += f" ({r.clock})"
        if many_scen:
            s = f"{r.scenario}: {s}"
        base[r.path] = s
    counts: dict[str, int] = {}
    for lab in base.values():
        counts[lab] = counts.get(lab, 0) + 1
    return {r.path: f"{base[r.path]} [{r.path.name}]" if counts[base[r.path]] > 1 else base[r.path]
            for r in runs}


def group_by_scenario(runs: Sequence[Run]) -> list[tuple[str, list[Run]]]:
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.scenario, []).append(r)
    return sorted(groups.items())


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> int:
    """Write rows (values through `fmt`); the number of rows. RunsError if not writable."""
    n = 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(columns)
            for row in rows:
                w.writerow([fmt(row.get(c)) for c in columns])
                n += 1
    except OSError as e:
        raise RunsError(f"{path}: cannot write ({e.strerror or e})") from None
    return n
