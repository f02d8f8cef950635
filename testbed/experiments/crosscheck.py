"""The analytic mode against the emulator: instances of the sweep run both ways.

Owns the cross-check behind tests/test_sweep.py and the report in results/paper/: an
instance of the sweep, background load included, converts to a scenario exactly
(`sweep.instance_to_scenario`), runs in the emulator (real tensors, virtual clock, oracle
telemetry) and in analytic mode (`sweep.simulate`), and every decode token's latency is
compared. The emulator's token k is the analytic token k - 1 (its token 0 is the prefill).
"""

from __future__ import annotations

import csv
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..analytic.simulate import MAX_LOAD, Instance, instance_to_scenario, make_instance, simulate
from ..placement.registry import get_algorithm
from ..scenario import parse
from . import run as experiment

MODELS = ("paper-small", "gpt-tiny", "paper-medium")
ALGORITHMS = ("resource_aware", "resource_aware_ls")
TOKENS, INTERVAL = 12, 1  # the conversion re-plans at every token, as `simulate(interval=1)`


def instances(n: int = 6, tokens: int = TOKENS, max_load: float = MAX_LOAD) -> list[Instance]:
    """n small instances of 3, 4 and 5 devices in turn, with the sweep's background load."""
    return [make_instance(MODELS[i % len(MODELS)], 3 + i % 3, tokens, np.random.default_rng([7, i]),
                          ident=f"check-{i}", max_load=max_load, prompt=(16, 32)) for i in range(n)]


def compare(inst: Instance, algorithm: str) -> dict[str, Any]:
    """One instance and algorithm both ways: the per-token latencies and how far apart."""
    ana = simulate(inst, get_algorithm(algorithm), interval=INTERVAL)
    prep = experiment.prepare(parse(instance_to_scenario(inst, algorithm), f"<{inst.ident}>"))
    with tempfile.TemporaryDirectory() as tmp:
        o = experiment.run(prep, algorithm, Path(tmp) / "run", clock="virtual")
        with open(o.run_dir / "tokens.csv", newline="") as f:
            decode = [r for r in csv.DictReader(f) if r["phase"] == "decode"]
    emu = [float(r["latency_ms"]) for r in decode]
    inference = [float(r["latency_ms"]) - float(r["stall_ms"]) for r in decode]  # without decisions and moves
    a = ana.latency_ms[: len(emu)]
    rel = [abs(x - y) / y for x, y in zip(a, emu, strict=False)]
    return {"instance": inst.ident, "model": inst.spec.name, "devices": inst.n_devices, "algorithm": algorithm,
            "tokens": len(emu), "interval": INTERVAL, "load_max": float(inst.load.max()),
            "analytic_ms": float(np.mean(a)) if a else math.nan, "emulated_ms": float(np.mean(emu)) if emu else math.nan,
            # how much the load moves a token's inference (its stall, decisions and moves, left
            # out): a check that the load is applied at all
            "emulated_spread": max(inference) / min(inference) if inference else math.nan,
            "max_rel_diff": max(rel) if rel else math.nan, "per_token_rel_diff": rel,
            "analytic_status": ana.status, "emulated_status": o.status,
            "migrations": (ana.migrations, o.summary.get("migrations", 0)),
            "tokens_match": o.summary["correctness"]["tokens_match"]}


def cross_check(n: int = 6, tokens: int = TOKENS) -> list[dict[str, Any]]:
    """Every algorithm of ALGORITHMS on `instances(n, tokens)`."""
    return [compare(inst, alg) for inst in instances(n, tokens) for alg in ALGORITHMS]
