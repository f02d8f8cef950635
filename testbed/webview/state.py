"""The view's model of runs: their result rows as they arrive, and the JSON the page reads.

Owns the state format served at `/api/state`, pushed to the page as updates and inlined
in reports (`STATE_VERSION`; documented in docs/live.md): per run its meta.json and
summary.json as written, and the rows of its five CSV files as column lists plus rows of
values, with a few fields derived for readers of the API (current token, status, devices,
current placement). Pure: no IO, no clock, no threads of its own. A live run feeds it from
its writer's tap (testbed/results/write.py: one list append per row, on the run's thread);
tools/view.py feeds it the rows of result files. Readers on another thread only take
lengths and slices of those lists, which CPython does atomically, so no lock is held on
the run's hot path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..results.write import FILES, TEXT_COLUMNS

STATE_VERSION = 1

# table name in the state -> result file and its columns
TABLES = {name.removesuffix(".csv"): (name, cols) for name, cols in FILES.items()}
_TABLE_OF_FILE = {name: table for table, (name, _) in TABLES.items()}


def cell(column: str, v: Any) -> Any:
    """A JSON value for a live value or a CSV cell: text columns as text, numbers as
    numbers, NaN and empty cells as null."""
    if v is None:
        return None
    if column in TEXT_COLUMNS:
        return str(v)
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    s = str(v).strip()
    if s == "":
        return None
    try:
        return int(s)
    except ValueError:
        pass
    try:
        x = float(s)
    except ValueError:
        return s  # not a number after all: shown as written
    return x if math.isfinite(x) else None


def clean(v: Any) -> Any:
    """JSON documents (meta, summary) without NaN or infinities, which JSON cannot carry."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {str(k): clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    return v


class RunRecord:
    """One run's records. `record` is the writer's tap; everything else reads."""

    def __init__(self, run_id: str, path: str = "", label: str | None = None) -> None:
        self.id, self.path, self.label = run_id, path, label
        self.meta: dict[str, Any] = {}
        self.summary: dict[str, Any] | None = None
        self.docs = 0  # bumped whenever meta or summary is replaced
        self.columns: dict[str, list[str]] = {t: list(cols) for t, (_, cols) in TABLES.items()}
        self.rows: dict[str, list[Mapping[str, Any]]] = {t: [] for t in TABLES}

    def record(self, name: str, row: dict[str, Any]) -> None:
        table = _TABLE_OF_FILE.get(name)
        if table is not None:
            self.rows[table].append(row)
        elif name == "meta.json":
            self.meta = row
            self.docs += 1
        elif name == "summary.json":
            self.summary = row
            self.docs += 1

    def load(self, table: str, columns: Iterable[str], rows: Iterable[Mapping[str, Any]]) -> None:
        """Rows read from a result file (a file may have columns added since)."""
        cols = list(self.columns[table])
        cols += [c for c in columns if c not in cols]
        self.columns[table] = cols
        self.rows[table].extend(rows)

    # ------------------------------------------------------------------ derived

    def _table(self, table: str, lo: int = 0, hi: int | None = None) -> list[list[Any]]:
        cols = self.columns[table]
        return [[cell(c, r.get(c)) for c in cols] for r in self.rows[table][lo:hi]]

    def token(self) -> int | None:
        """The last token produced (None before the first)."""
        rows = self.rows["tokens"]
        return int(cell("token", rows[-1].get("token")) or 0) if rows else None

    def status(self) -> str:
        s = (self.summary or {}).get("status") or self.meta.get("status")
        return str(s) if s else "starting"

    def devices(self) -> list[str]:
        """The scenario's devices, then any others the placement used (devices that joined)."""
        found = self.meta.get("scenario")
        scen: dict[str, Any] = found if isinstance(found, dict) else {}
        names = [str(d.get("name")) for d in scen.get("devices", []) if isinstance(d, dict)]
        for r in self.rows["placements"]:
            if str(r.get("device")) not in names:
                names.append(str(r.get("device")))
        return names

    def placement(self, upto: int | None = None) -> dict[str, str]:
        """Block -> device as of token `upto` (default: now)."""
        out: dict[str, str] = {}
        for r in self.rows["placements"]:
            k = cell("token", r.get("token"))
            if upto is None or (isinstance(k, int) and k <= upto):
                out[str(r.get("block"))] = str(r.get("device"))
        return out

    def to_json(self, cursor: dict[str, int] | None = None) -> dict[str, Any]:
        """The run's state. With a `cursor` (updated in place to what this call returns):
        if it is empty, the whole state; else only what was recorded since, or {} if
        nothing was."""
        counts = {t: len(self.rows[t]) for t in TABLES}  # taken once: the writer goes on
        docs = self.docs
        first = not cursor
        lo = cursor or {}
        if not first and lo.get("docs") == docs and all(lo.get(t) == n for t, n in counts.items()):
            return {}
        out: dict[str, Any] = {"id": self.id, "label": self.label, "path": self.path,
                               "token": self.token(), "status": self.status()}
        if first or lo.get("docs") != docs:
            out["meta"], out["summary"] = clean(self.meta), clean(self.summary)
        if first:
            out["columns"] = {t: list(c) for t, c in self.columns.items()}
            out["devices"] = self.devices()
            out["placement"] = self.placement()
        out["rows"] = {t: self._table(t, lo.get(t, 0), n) for t, n in counts.items()}
        if cursor is not None:
            cursor.update(counts, docs=docs)
        return out


@dataclass
class Cursor:
    """What one reader (a page) has been sent so far."""

    runs: dict[str, dict[str, int]] = field(default_factory=dict)
    note: str | None = None
    finished: bool | None = None


class Feed:
    """The runs one page shows, in order (a live run adds one per algorithm)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode  # live | view | report
        self.runs: list[RunRecord] = []
        self.note = ""  # what the runner is doing between runs (computing the reference, ...)
        self.finished = False  # no run will be added or recorded any more

    def add(self, run: RunRecord) -> RunRecord:
        self.runs.append(run)
        return run

    def snapshot(self, cursor: Cursor | None = None) -> dict[str, Any]:
        """The whole state; a `cursor` given is set to it, for `delta`."""
        cursor = cursor if cursor is not None else Cursor()
        finished = self.finished  # before the runs: a run recorded after this is sent later
        cursor.runs.clear()
        runs = [r.to_json(cursor.runs.setdefault(r.id, {})) for r in list(self.runs)]
        cursor.note, cursor.finished = self.note, finished
        return {"format_version": STATE_VERSION, "mode": self.mode, "note": self.note,
                "finished": finished, "runs": runs}

    def delta(self, cursor: Cursor) -> dict[str, Any] | None:
        """What changed since `cursor` (updated in place): new rows of known runs, whole
        new runs (their index tells which); None when nothing did."""
        finished = self.finished
        changed = []
        for i, r in enumerate(list(self.runs)):
            part = r.to_json(cursor.runs.setdefault(r.id, {}))
            if part:
                changed.append({"index": i, **part})
        if not changed and (cursor.note, cursor.finished) == (self.note, finished):
            return None
        cursor.note, cursor.finished = self.note, finished
        return {"note": self.note, "finished": finished, "runs": changed}
