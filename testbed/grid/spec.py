"""The experiment file (YAML, version 1): a base scenario, axes over any of its values by key
path, algorithms, seeds, and what to report; read strictly and expanded into runs.

Owns `load(path)` and `parse(mapping, file)` (an `Experiment`, every problem an
`ExperimentError` naming the file, the key and, for a value that makes an invalid scenario,
the cell), the key paths (`network.default.bandwidth_mbps`, `events[0].bandwidth_mbps`,
`devices[phone].compute_gflops`: a list item by index, or by its `name` or `device`), the
cells (the axes crossed or zipped), `runs()` (every cell x algorithm x seed resolved to a
checked `Scenario`) and `run_key`, the hash of the resolved scenario, algorithm, seed and
clock that names a run's directory, so that a run already done is recognised. Every cell is
resolved and checked when the file is read, before anything runs. The reference is
docs/experiments.md.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..common.files import FileRefused, read_limited, utf8
from ..scenario import (
    MAX_FILE_BYTES,
    MAX_NESTING,
    MAX_SEED,
    MAX_TIME_SCALE,
    Scenario,
    ScenarioError,
)
from ..scenario import load as load_scenario
from ..scenario import parse as parse_scenario
from ..scenario.reader import Reader, StrictLoader, check_nesting, short, type_name, yaml_problem
from .stats import FIGURES

KEYS: dict[str, tuple[str, ...]] = {
    "": ("version", "name", "description", "scenario", "set", "axes", "combine", "algorithms", "seeds",
         "tokens", "clock", "time_scale", "report"),
    "seeds": ("from", "count"),
}
REQUIRED = ("version", "name", "scenario", "axes", "algorithms", "seeds")
COMBINE = ("cross", "zip")
CLOCKS = ("virtual", "real")
NAME = re.compile(r"[a-z0-9_-]+")
MAX_RUNS = 100_000  # cells x algorithms x seeds: more is a typo
MAX_SEEDS = 10_000
DEFAULT_REPORT = ("latency_mean_ms",)
SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[[^\[\]]+\])*)")
INDEX = re.compile(r"\[([^\[\]]+)\]")


class ExperimentError(ScenarioError):
    """An experiment file that cannot be run: one line, `FILE: key: what` (the cell named
    when a value makes an invalid scenario)."""


class _Reader(Reader):
    keys = KEYS


@dataclass(frozen=True)
class Cell:
    """One point of the grid: the value of every axis, and the base scenario with them set."""

    index: int
    values: tuple[tuple[str, Any], ...]
    data: dict

    def label(self) -> str:
        return ", ".join(f"{p}={v}" for p, v in self.values)


@dataclass(frozen=True)
class Run:
    """One cell x algorithm x seed, resolved: its scenario and the key that names it."""

    cell: Cell
    algorithm: str
    seed: int
    scenario: Scenario
    key: str


@dataclass(frozen=True)
class Experiment:
    file: str
    name: str
    description: str
    scenario_file: str
    fixed: tuple[tuple[str, Any], ...]
    axes: tuple[tuple[str, tuple], ...]
    combine: str
    algorithms: tuple[str, ...]
    seeds: tuple[int, ...]
    tokens: int | None
    clock: str
    time_scale: float | None
    report: tuple[str, ...]
    cells: tuple[Cell, ...]
    runs: tuple[Run, ...]
    raw: dict

    @property
    def axis_names(self) -> list[str]:
        return [p for p, _ in self.axes]


# ---------------------------------------------------------------------------------------------
# key paths


def split_path(path: str) -> list[str | int]:
    """`devices[phone].compute_gflops` -> ['devices', '[phone]', 'compute_gflops'];
    `events[0].x` -> ['events', 0, 'x']. ValueError on a malformed path."""
    out: list[str | int] = []
    if not path:
        raise ValueError("an empty key path")
    for seg in path.split("."):
        m = SEGMENT.fullmatch(seg)
        if not m:
            raise ValueError(f"{short(seg)!r} is not a key (a name, optionally followed by [index] or [name])")
        out.append(m.group(1))
        for sel in INDEX.findall(m.group(2)):
            out.append(int(sel) if sel.isdigit() else f"[{sel}]")
    return out


def _item(items: list, sel: str | int, where: str) -> int:
    if isinstance(sel, int):
        if sel >= len(items):
            raise LookupError(f"{where} has {len(items)} item(s), no [{sel}]")
        return sel
    name = sel[1:-1]
    found = [i for i, it in enumerate(items) if isinstance(it, dict) and name in (it.get("name"), it.get("device"))]
    if len(found) != 1:
        raise LookupError(f"{where} has {'no' if not found else 'more than one'} item named {short(name)!r}")
    return found[0]


def set_path(data: dict, path: str, value: Any) -> None:
    """Set the value at `path` in the scenario mapping `data` (in place). Every list item on
    the way must exist; a mapping key that is missing is added (the scenario's own strict
    reading then refuses a key it does not know). LookupError or ValueError says why not."""
    parts = split_path(path)
    node: Any = data
    where = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(part, str) and not part.startswith("["):
            if not isinstance(node, dict):
                raise LookupError(f"{where or 'the top level'} is a {type_name(node)}, not a mapping")
            where = f"{where}.{part}" if where else part
            if last:
                node[part] = copy.deepcopy(value)
                return
            if part not in node:
                nxt = parts[i + 1]
                if not isinstance(nxt, str) or nxt.startswith("["):
                    raise LookupError(f"{where} is not in the base scenario")
                node[part] = {}
            node = node[part]
        else:
            if not isinstance(node, list):
                raise LookupError(f"{where} is a {type_name(node)}, not a list")
            idx = _item(node, part, where)
            where = f"{where}[{part if isinstance(part, int) else part[1:-1]}]"
            if last:
                node[idx] = copy.deepcopy(value)
                return
            node = node[idx]


# ---------------------------------------------------------------------------------------------
# reading


def load(path: str | os.PathLike) -> Experiment:
    file = os.fspath(path)
    try:
        text = utf8(read_limited(file, MAX_FILE_BYTES, "an experiment file"))
    except FileRefused as e:
        raise ExperimentError(file, "", str(e)) from None
    try:
        check_nesting(text, MAX_NESTING)
        data = yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ExperimentError(file, "", f"not valid YAML: {yaml_problem(e)}") from None
    return parse(data, file)


def _values(r: _Reader, value: object, path: str) -> list:
    items = r.list_(value, path)
    if not items:
        r.fail(path, "is empty: an axis needs at least one value")
    return items


def _seeds(r: _Reader, value: object) -> tuple[int, ...]:
    if isinstance(value, dict):
        r.section(value, "seeds", "seeds", ("from", "count"))
        start = r.int_(value["from"], "seeds.from", ge=0, le=MAX_SEED)
        count = r.int_(value["count"], "seeds.count", ge=1, le=MAX_SEEDS)
        if start + count - 1 > MAX_SEED:
            r.fail("seeds", f"seeds beyond {MAX_SEED}")
        return tuple(range(start, start + count))
    if not isinstance(value, list):
        r.fail("seeds", f"must be a list of seeds or {{from: N, count: M}}, got {type_name(value)}")
    if not value:
        r.fail("seeds", "is empty")
    seeds = tuple(r.int_(s, f"seeds[{i}]", ge=0, le=MAX_SEED) for i, s in enumerate(value))
    if len(set(seeds)) != len(seeds):
        r.fail("seeds", "a seed is listed twice")
    return seeds


def parse(data: object, file: str = "<data>") -> Experiment:
    """Validate an experiment mapping, read its base scenario (relative to the file), expand
    and resolve every run; ExperimentError on the first problem."""
    r = _Reader(file)
    try:
        return _parse(r, data, file)
    except ExperimentError:
        raise
    except ScenarioError as e:  # raised by the reader's checks: the same one line
        raise ExperimentError(file, e.path, e.message) from None


def _parse(r: _Reader, data: object, file: str) -> Experiment:
    if not isinstance(data, dict):
        r.fail("", f"the top level must be a mapping, got {type_name(data)}")
    top = r.section(data, "", "", REQUIRED)
    if r.int_(top["version"], "version") != 1:
        r.fail("version", "unsupported version (this testbed reads version 1)")
    name = r.string(top["name"], "name", pattern=NAME, max_len=64)
    description = r.string(top.get("description", ""), "description", max_len=10_000)
    scen_rel = r.string(top["scenario"], "scenario")
    scen_path = Path(scen_rel) if Path(scen_rel).is_absolute() else Path(file).parent / scen_rel
    try:
        base_scen = load_scenario(scen_path)
    except ScenarioError as e:
        r.fail("scenario", f"the base scenario is not valid: {e}")
    base = copy.deepcopy(base_scen.raw)
    if base_scen.model.gguf and "gguf" in (base.get("model") or {}):
        base["model"]["gguf"] = str(base_scen.model.gguf)  # resolved against the scenario's directory

    fixed: list[tuple[str, Any]] = []
    for key, value in r.mapping(top.get("set", {}), "set").items():
        path = f"set.{short(str(key))}"
        if not isinstance(key, str):
            r.fail(path, "must be a key path")
        fixed.append((key, value))
    axes: list[tuple[str, tuple]] = []
    raw_axes = r.mapping(top["axes"], "axes")
    if not raw_axes:
        r.fail("axes", "is empty: give at least one key path and its values")
    for key, value in raw_axes.items():
        if not isinstance(key, str):
            r.fail(f"axes.{short(str(key))}", "must be a key path")
        axes.append((key, tuple(_values(r, value, f"axes.{key}"))))
    for kind, items in (("set", fixed), ("axes", axes)):
        for key, _ in items:
            try:
                split_path(key)
            except ValueError as e:
                r.fail(f"{kind}.{key}", str(e))
    for key, _ in fixed:
        if key in raw_axes:
            r.fail(f"set.{key}", "is an axis too")
    combine = r.choice(top.get("combine", "cross"), "combine", COMBINE, "combination")
    if combine == "zip" and len({len(v) for _, v in axes}) > 1:
        r.fail("axes", "zipped axes must have as many values each ("
               + ", ".join(f"{p}: {len(v)}" for p, v in axes) + ")")

    algs_raw = r.list_(top["algorithms"], "algorithms")
    if not algs_raw:
        r.fail("algorithms", "is empty")
    algorithms = tuple(r.string(a, f"algorithms[{i}]", max_len=1000) for i, a in enumerate(algs_raw))
    if len(set(algorithms)) != len(algorithms):
        r.fail("algorithms", "an algorithm is listed twice")
    seeds = _seeds(r, top["seeds"])
    tokens = r.int_(top["tokens"], "tokens", ge=1) if "tokens" in top else None
    clock = r.choice(top.get("clock", "virtual"), "clock", CLOCKS, "clock")
    time_scale = None
    if "time_scale" in top:
        if clock != "real":
            r.fail("time_scale", "applies to the real clock only (clock: real)")
        time_scale = r.number(top["time_scale"], "time_scale", gt=0.0, le=MAX_TIME_SCALE)
    elif clock == "real":
        r.fail("time_scale", "is required with clock: real (runs in parallel cannot each calibrate one)")
    report_raw = r.list_(top.get("report", list(DEFAULT_REPORT)), "report")
    if not report_raw:
        r.fail("report", "is empty")
    report = tuple(r.choice(f, f"report[{i}]", tuple(FIGURES), "figure") for i, f in enumerate(report_raw))

    combos = (itertools.product(*(v for _, v in axes)) if combine == "cross"
              else zip(*(v for _, v in axes), strict=True))
    cells: list[Cell] = []
    for values in combos:
        if len(cells) * len(algorithms) * len(seeds) >= MAX_RUNS:
            r.fail("axes", f"more than {MAX_RUNS} runs (cells x algorithms x seeds)")
        cell_values = tuple((p, v) for (p, _), v in zip(axes, values, strict=True))
        cell = Cell(len(cells), cell_values, {})
        scen_data = copy.deepcopy(base)
        for kind, items in (("set", fixed), ("axes", list(cell_values))):
            for key, value in items:
                try:
                    set_path(scen_data, key, value)
                except (LookupError, ValueError) as e:
                    r.fail(f"{kind}.{key}", f"cell {cell.index} ({cell.label()}): no such value: {e}")
        cells.append(Cell(cell.index, cell_values, scen_data))

    runs: list[Run] = []
    for cell in cells:
        for seed in seeds:
            scen = _resolve(r, cell, seed, tokens, str(scen_path), fixed)
            for alg in algorithms:
                runs.append(Run(cell, alg, seed, scen, run_key(scen, alg, clock, time_scale)))
    return Experiment(file, name, description, str(scen_path), tuple(fixed), tuple(axes), combine, algorithms,
                      seeds, tokens, clock, time_scale, report, tuple(cells), tuple(runs), data)


def _index_path(data: dict, key: str) -> str:
    """`key` with its list items by name written by index (`devices[phone]` -> `devices[3]`),
    as the scenario's own errors name them."""
    out = ""
    node: Any = data
    for part in split_path(key):
        if isinstance(part, str) and not part.startswith("["):
            out = f"{out}.{part}" if out else part
            node = node.get(part) if isinstance(node, dict) else None
        else:
            idx = _item(node, part, out) if isinstance(node, list) else -1
            out += f"[{idx}]"
            node = node[idx] if idx >= 0 else None
    return out


def _blame(path: str, keys: list[str], data: dict) -> str | None:
    """The axis (or fixed) key a scenario error at `path` comes from, if any."""
    for key in keys:
        for form in {key, _index_path(data, key)}:
            if path == form or path.startswith((f"{form}.", f"{form}[")):
                return key
    return None


def _resolve(r: _Reader, cell: Cell, seed: int, tokens: int | None, scen_file: str,
             fixed: list[tuple[str, Any]]) -> Scenario:
    data = copy.deepcopy(cell.data)
    data["seed"] = seed
    if tokens is not None:
        gen = data.get("generation")
        if isinstance(gen, dict):
            gen["new_tokens"] = tokens
    try:
        return parse_scenario(data, scen_file)
    except ScenarioError as e:
        names = [p for p, _ in cell.values]
        key = _blame(e.path, names, data)
        kind = "axes"
        if key is None:
            key = _blame(e.path, [p for p, _ in fixed], data)
            kind = "set" if key is not None else kind
        if key is None and len(names) == 1:
            key, kind = names[0], "axes"  # the only value that differs between cells
        where = f"{kind}.{key}" if key else ("tokens" if e.path.startswith("generation") and tokens else "axes")
        r.fail(where, f"cell {cell.index} ({cell.label()}), seed {seed}: makes an invalid scenario: "
               f"{e.path + ': ' if e.path else ''}{e.message}")


def run_key(scen: Scenario, algorithm: str, clock: str, time_scale: float | None) -> str:
    """The hash that names a run: of the resolved scenario (defaults filled in, so two
    spellings of one scenario are one run), the algorithm, the seed (in the scenario) and
    the clock. A run whose key is already in the experiment's directory is not run again."""
    blob = json.dumps({"scenario": scen.to_dict(), "algorithm": algorithm, "clock": clock,
                       "time_scale": time_scale}, sort_keys=True, default=_plain)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _plain(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, tuple | set | frozenset):
        return sorted(value) if isinstance(value, set | frozenset) else list(value)
    return str(value)
