"""A decision's one emulated cost (placement/policy.py `decision_cost_s`): declared per
algorithm, waited out by the controller on the emulated timeline and added to the stall by
the analytic simulation, so the plan takes effect at the same emulated instant everywhere."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from testbed.analytic.simulate import make_instance, simulate
from testbed.experiments import run as experiment
from testbed.placement.policy import DECISION_COST, DEFAULT_DECISION_COST, decision_cost_s
from testbed.placement.problem import Placement, Snapshot
from testbed.placement.registry import get_algorithm

from .conftest import make_scenario
from .test_placement import snapshot


class Declared:
    """resource_aware's placements under a declared decision cost."""

    dynamic = True

    def __init__(self, cost: tuple[float, float] | None, name: str = "declared") -> None:
        self.inner = get_algorithm("resource_aware")
        self.decision_cost = cost
        self.name = name

    def place(self, snap: Snapshot) -> Placement:
        return self.inner.place(snap)


def test_the_cost_is_declared_per_algorithm_and_grows_with_blocks_times_devices() -> None:
    snap = snapshot()
    pairs = len(snap.spec.blocks) * len(snap.devices)
    fixed, per_pair = DECISION_COST["resource_aware_ls"]
    assert decision_cost_s(get_algorithm("resource_aware_ls"), snap) == pytest.approx(fixed + per_pair * pairs)
    assert decision_cost_s(get_algorithm("resource_aware_ls"), snap) > decision_cost_s(get_algorithm("greedy"), snap)
    assert decision_cost_s(Declared((0.25, 0.0)), snap) == 0.25  # a plug-in's own declaration
    fixed, per_pair = DEFAULT_DECISION_COST
    assert decision_cost_s(Declared(None, "plugin"), snap) == pytest.approx(fixed + per_pair * pairs)


def test_the_analytic_simulation_adds_the_cost_to_each_decisions_token() -> None:
    inst = make_instance("paper-small", 3, 9, np.random.default_rng(2), max_load=0.0)
    free = simulate(inst, Declared((0.0, 0.0)), interval=4)
    paid = simulate(inst, Declared((0.05, 0.0)), interval=4)
    assert free.status == paid.status == "completed" and free.replans == paid.replans == 3
    extra = np.array(paid.stall_ms) - np.array(free.stall_ms)
    # generated token t is the controller's token k = t + 1: decisions before k = 4 and 8, t = 3 and 7
    assert [t for t, x in enumerate(extra) if x] == [3, 7]
    assert extra[[3, 7]] == pytest.approx([50.0, 50.0])
    assert np.array(paid.latency_ms) - np.array(free.latency_ms) == pytest.approx(extra)


def _virtual(cost: tuple[float, float], tmp: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    prep = experiment.prepare(make_scenario(new_tokens=6, interval=2))
    out = experiment.run(prep, Declared(cost), tmp, clock="virtual")
    with open(out.run_dir / "tokens.csv") as f:
        tokens = list(csv.DictReader(f))
    with open(out.run_dir / "events.csv") as f:
        replans = [e for e in csv.DictReader(f) if e["kind"] == "replan"]
    return tokens, replans


def test_the_controller_waits_a_decisions_cost_out_on_the_emulated_timeline(tmp_path: Path) -> None:
    """On the virtual clock the host's time is not seen, so only the modelled cost can
    move the stall: 40 ms more per decision on exactly the tokens that re-plan."""
    t0, r0 = _virtual((0.0, 0.0), tmp_path / "free")
    t1, r1 = _virtual((0.04, 0.0), tmp_path / "paid")
    assert len(r0) == len(r1) == 3  # the initial placement, then before tokens 2 and 4
    assert all(re.search(r" cost_ms=40\.000 ", e["detail"]) for e in r1)
    stall = [float(b["stall_ms"]) - float(a["stall_ms"]) for a, b in zip(t0, t1, strict=True)]
    assert stall == pytest.approx([0, 0, 40, 0, 40, 0], abs=1e-6)
    lat = [float(b["latency_ms"]) - float(a["latency_ms"]) for a, b in zip(t0, t1, strict=True)]
    assert lat == pytest.approx(stall, abs=1e-6)


def test_a_malformed_declared_cost_stops_the_run_with_one_line() -> None:
    from testbed.placement.policy import Policy, Stop

    for bad in ((1.0,), ("x", 0.0), (-1.0, 0.0), (float("nan"), 0.0)):
        with pytest.raises(Stop, match=r"^declared: decision_cost must be"):
            Policy(Declared(bad), 4, 4).decide(snapshot(), "interval")  # type: ignore[arg-type]  # bad on purpose
