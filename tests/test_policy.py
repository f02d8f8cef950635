"""The control policy (pure): its schedule, emergencies, the soft-to-hard fallback, the
predicted gain; and that the analytic simulation follows it (the controller's side:
tests/test_scenarios.py checks its messages and replan rows on memory_pressure)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np
import pytest

from testbed.analytic.simulate import make_instance, simulate
from testbed.placement.policy import Policy, Stop, TokenCharge
from testbed.placement.problem import Infeasible, LatencyModel, Placement, Snapshot, epoch_objective
from testbed.placement.registry import get_algorithm

from .test_placement import snapshot


@dataclass
class Const:
    """Answers one placement; `dynamic` as given; raises what `fail` says first."""

    assign: tuple[int, ...]
    dynamic: bool = True
    fail: list[BaseException] | None = None
    name: str = "const"
    calls: int = 0

    def place(self, snap: Snapshot) -> Placement:
        self.calls += 1
        if self.fail:
            raise self.fail.pop(0)
        return Placement(snap.spec, self.assign)


def test_schedule_first_placement_epochs_and_signals() -> None:
    pol = Policy(Const((0,)), interval=4, prompt=10)
    assert pol.horizon(0) == (0, 14)  # the prefill and the first interval
    assert pol.horizon(5) == (14, 4) and pol.seq_len(5) == 14 and pol.seq_len(0) == 0
    assert [k for k in range(13) if pol.due(k)] == [4, 8, 12]
    assert pol.due(5, "link_change@a->b") == "emergency:link_change@a->b"
    assert pol.due(0, "join@x") is None  # the first placement is not a re-plan
    still = Policy(Const((0,), dynamic=False), interval=4, prompt=10)
    assert not any(still.due(k, "join@x") for k in range(13))


def test_emergencies() -> None:
    pol = Policy(Const((0,)), interval=1, prompt=3)
    assert pol.emergency("oom", 7, ["b"]) == "emergency:oom@b"
    assert pol.emergency("lost", 7, ["b", "c"]) == "emergency:lost@b,c"
    assert pol.emergency("stall", 7, detail="token 7 took over 1 s") == "emergency:stall"
    pol.repaired("oom", 7, 2, ["b"])
    pol.repaired("stall", 7, 0)
    with pytest.raises(Stop, match="out of memory on b at token 7 and re-planning moved nothing"):
        pol.repaired("oom", 7, 0, ["b"])
    still = Policy(Const((0,), dynamic=False), interval=1, prompt=3)
    with pytest.raises(Stop, match=r"out of memory on b at token 7 \(const does not re-plan\)"):
        still.emergency("oom", 7, ["b"])
    with pytest.raises(Stop, match="b, c failed and const does not re-plan"):
        still.emergency("lost", 7, ["b", "c"])
    with pytest.raises(Stop, match="token 7 took over 1 s and const does not re-plan"):
        still.emergency("stall", 7, detail="token 7 took over 1 s")
    with pytest.raises(ValueError):
        pol.emergency("fire", 7)


def test_decision_falls_back_to_the_hard_limits() -> None:
    snap = snapshot()
    n = len(snap.spec.blocks)
    alg = Const((1,) * n, fail=[Infeasible("soft")])
    d = Policy(alg, 4, 16).decide(snap, "interval")
    assert alg.calls == 2 and d.reason == "interval,hard_limits"
    assert d.snap == snap.hard() and d.placement.assign == (1,) * n
    both = Const((1,) * n, fail=[Infeasible("soft"), Infeasible("none at all")])
    with pytest.raises(Stop) as e:
        Policy(both, 4, 16).decide(snap, "interval")
    assert (e.value.message, e.value.event, e.value.detail) == ("infeasible: none at all", "infeasible", "none at all")
    with pytest.raises(Stop) as e:
        Policy(Const((1,) * n, fail=[ValueError("too large")]), 4, 16).decide(snap, "interval")
    assert (e.value.message, e.value.event) == ("const failed: too large", "algorithm_error")


def test_predicted_gain_and_moves() -> None:
    snap = snapshot(interval=500)  # a long epoch: moving off the slow device pays
    n = len(snap.spec.blocks)
    cur = Placement(snap.spec, (2,) * n)  # everything on the slowest device
    pol = Policy(Const((1,) * n), 4, 16)
    first = pol.decide(snap, "initial")
    assert first.moves == [] and math.isnan(first.predicted_gain_s)
    assert first.describe(1.5) == f"reason=initial decision_ms=1.500 moves={n}"
    d = pol.decide(snap.with_(current=cur), "interval")
    lm = LatencyModel(d.snap)
    want = epoch_objective(d.snap, cur, lm) - epoch_objective(d.snap, d.placement, lm)
    assert d.predicted_gain_s == want and want > 0
    assert len(d.moves) == n and d.describe(2.0).endswith(f"moves={n} predicted_gain_ms={want * 1e3:.3f}")
    assert d.migration_delay(d.snap) > 0


def test_token_charge_adds_up() -> None:
    c = TokenCharge()
    c.add(0.25)
    c.add(0.5, 3, 100)
    assert (c.stall_s, c.migrations, c.migrated_bytes) == (0.75, 3, 100)


def test_analytic_simulation_decides_on_the_controllers_schedule() -> None:
    """The sweep's decisions are the controller's: the first placement, then one at every
    multiple of the interval in the controller's token numbering (generated token t is
    token t + 1 there)."""
    inst = make_instance("paper-small", 3, 13, np.random.default_rng(2), max_load=0.0)
    seen: list[tuple[int, int]] = []
    alg = get_algorithm("resource_aware")
    inner = alg.place

    def spy(snap: Snapshot) -> Placement:
        seen.append((snap.seq_len, snap.interval))
        return inner(snap)

    alg.place = spy  # type: ignore[method-assign]
    r = simulate(inst, alg, interval=4)
    p = inst.prompt
    assert r.status == "completed" and r.replans == 4
    assert seen == [(0, p + 4), (p + 3, 4), (p + 7, 4), (p + 11, 4)]


def test_analytic_out_of_memory_emergency_and_static_failure() -> None:
    """A placement that stops fitting (the load grows) is an emergency: a re-planning
    algorithm re-plans at once; one that does not fails with the controller's message."""
    inst = make_instance("paper-small", 3, 6, np.random.default_rng(4), max_load=0.0)
    load = inst.load.copy()
    load[16 + 3:, :] = 1.0 - 1e-9  # from token t = 3 (k = 4) on, every device is full
    inst = replace(inst, load=load)
    r = simulate(inst, get_algorithm("static"), interval=100)
    assert re.fullmatch(r"failed: out of memory on d\d at token 4 \(static does not re-plan\)", r.status), r.status
    assert r.oom == 1 and len(r.latency_ms) == 3
