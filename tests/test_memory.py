"""Memory budgets: cgroup-like max/high semantics, refusals that change nothing, and what a
run records when memory gets tight."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from testbed.agents import messages as P
from testbed.agents.device import DeviceAgent
from testbed.emulation.clock import run as run_loop
from testbed.emulation.memory import MemoryBudget, MemoryRefused
from testbed.experiments import run as experiment
from testbed.model import cost
from testbed.model.blocks import RandomWeights
from testbed.model.spec import from_name
from testbed.scenario import DeviceSpec

from .conftest import Fixed, make_scenario, read_csv, read_json, run_virtual


def test_budget_refuses_over_max_and_changes_nothing() -> None:
    b = MemoryBudget("d", max_bytes=1000, high_bytes=800)
    b.charge("weights", 600)
    before = dict(b.by_category)
    with pytest.raises(MemoryRefused) as e:
        b.charge("kv", 401)
    assert e.value.nbytes == 401 and "refused" in str(e.value)
    assert b.by_category == before and b.current == 600
    assert (b.events_oom, b.events_max) == (1, 1)
    b.charge("kv", 400)  # exactly max is allowed
    assert b.current == 1000 and b.available == 0


def test_budget_high_peak_release() -> None:
    b = MemoryBudget("d", max_bytes=1000, high_bytes=500)
    b.charge("weights", 400)
    assert not b.over_high and b.events_high == 0
    b.charge("kv", 200)
    assert b.over_high and b.events_high == 1
    b.charge("kv", 100)  # still above: not a new crossing
    assert b.events_high == 1
    b.release("kv", 300)
    b.charge("kv", 200)
    assert b.events_high == 2 and b.peak == 700
    with pytest.raises(ValueError):
        b.release("kv", 10_000)
    assert b.take_up_to("pressure", 10_000) == 1000 - b.current + b.by_category["pressure"]
    assert b.available == 0
    with pytest.raises(ValueError):
        MemoryBudget("bad", max_bytes=100, high_bytes=200)


def test_budget_hold_sets_a_level_past_max_without_a_pressure_signal() -> None:
    """The background load's memory: set (not added) every token, past max if it comes to
    that; then our own allocations are refused. Crossing high counts, but no pressure push."""
    signals: list[str] = []
    b = MemoryBudget("d", max_bytes=1000, high_bytes=800, on_high=lambda: signals.append("high"),
                     on_pressure=lambda: signals.append("pressure"))
    b.charge("weights", 500)
    b.hold("background", 200)
    b.hold("background", 100)  # a level, not an increment
    assert b.current == 600 and b.by_category["background"] == 100 and signals == []
    b.hold("background", 700)  # the co-tenant takes more than is free: held anyway
    assert b.current == 1200 and b.available < 0 and b.peak == 1200
    assert signals == ["high"] and b.events_high == 1 and b.events_oom == 0
    with pytest.raises(MemoryRefused):
        b.charge("kv", 1)
    b.hold("background", 0)
    b.charge("kv", 1)
    assert b.counters()["background_bytes"] == 0
    with pytest.raises(ValueError):
        b.hold("background", -1)


def _agent(memory: int, sent: list[tuple[str, dict[str, Any]]]) -> DeviceAgent:
    spec = from_name("gpt-tiny")
    dev = DeviceSpec("d", compute_gflops=10, memory_mib=memory / 2**20, memory_high_mib=memory / 2**20)
    return DeviceAgent(dev, spec, RandomWeights(spec, 0), lambda dst, m, at=None: sent.append((dst, m)) or 0, source="src")


def test_refused_cache_append_leaves_caches_intact() -> None:
    """A device at its max refuses the next cache append: an oom error goes to the
    controller, the counters say so, and every cache keeps exactly what it had."""
    spec = from_name("gpt-tiny")
    sent: list[tuple[str, dict[str, Any]]] = []

    async def main() -> None:
        heads = [f"head.0.{g}" for g in range(spec.groups)]
        need = sum(cost.weight_bytes(spec, "head") for _ in heads) + 3 * spec.groups * cost.cache_bytes_per_token(spec)
        agent = _agent(need, sent)
        agent.handle("src", {"t": P.LOAD, "rid": 1, "blocks": heads})
        assert sent[-1][1]["ok"]
        # route: layer 0's heads here, everything else elsewhere
        assign = [0 if b.name in heads else 1 for b in spec.blocks]
        agent.handle("src", {"t": P.ROUTE, "rid": 2, "version": 1, "devices": ["d", "other"], "assign": assign})
        for pos in range(3):  # three positions fit exactly
            agent.handle("src", {"t": P.LAYER_INPUT, "seq": pos + 1, "layer": 0, "pos": pos,
                                 "x": torch.randn(1, spec.d_model)})
            await asyncio.sleep(1)
        assert all(n == 3 for n in agent.cache_lengths().values())
        kv = {n: (b.cache.k.clone(), b.cache.v.clone()) for n, b in agent.blocks.items()}
        usage = dict(agent.budget.by_category)
        agent.handle("src", {"t": P.LAYER_INPUT, "seq": 4, "layer": 0, "pos": 3, "x": torch.randn(1, spec.d_model)})
        await asyncio.sleep(1)
        errors = [m for _, m in sent if m["t"] == P.ERROR]
        assert len(errors) == 1 and errors[0]["kind"] == "oom" and errors[0]["seq"] == 4
        assert agent.budget.events_oom == 1 and agent.budget.by_category == usage
        assert all(n == 3 for n in agent.cache_lengths().values())
        for n, b in agent.blocks.items():
            assert torch.equal(b.cache.k, kv[n][0]) and torch.equal(b.cache.v, kv[n][1])
        await agent.stop()

    run_loop(main, "virtual")


def test_load_refused_over_max_installs_nothing() -> None:
    sent: list[tuple[str, dict[str, Any]]] = []

    async def main() -> None:
        agent = _agent(cost.weight_bytes(from_name("gpt-tiny"), "ffn") - 1, sent)
        agent.handle("src", {"t": P.LOAD, "rid": 1, "blocks": ["ffn.0"]})
        reply = sent[-1][1]
        assert not reply["ok"] and "ffn.0" in reply["refused"]
        assert agent.blocks == {} and agent.budget.current == 0 and agent.budget.events_oom == 1

    run_loop(main, "virtual")


def test_high_crossing_shows_in_telemetry(tmp_path: Path) -> None:
    """Pressure that crosses a device's high limit (but not max) is visible per token."""
    scen = make_scenario(n_devices=2, new_tokens=6, memory_mib=8, algorithm="static",
                         events=[{"at_token": 3, "action": "memory_pressure", "device": "a", "take_mib": 7.5}])
    o = run_virtual(scen, "static", tmp_path)
    assert o.ok, o.status
    tel = [r for r in read_csv(o.run_dir / "telemetry.csv") if r["device"] == "a"]
    assert {r["over_high"] for r in tel if int(r["token"]) < 3} == {"0"}
    assert {r["over_high"] for r in tel if int(r["token"]) >= 3} == {"1"}
    assert int(tel[-1]["pressure_bytes"]) > 0 and int(tel[-1]["high_events"]) == 1
    kinds = [(e["kind"], e["subject"]) for e in read_csv(o.run_dir / "events.csv")]
    assert ("memory_pressure", "a") in kinds and ("memory_high", "a") in kinds


def test_static_run_out_of_memory_fails_cleanly(tmp_path: Path) -> None:
    """A static placement whose device runs out of room records the oom and fails with
    partial results (no re-planning)."""
    scen = make_scenario(n_devices=2, new_tokens=8, memory_mib=8, algorithm="static",
                         events=[{"at_token": 4, "action": "memory_pressure", "device": "a", "take_mib": 64}])
    prep = experiment.prepare(scen)
    # every head on device a, the rest on the source
    assign = [1 if b.kind == "head" else 0 for b in prep.model.blocks]
    o = run_virtual(scen, Fixed(assign), tmp_path, prep)
    assert o.status.startswith("failed: out of memory on a at token 4")
    assert read_json(o.run_dir / "meta.json")["status"] == o.status
    summary = read_json(o.run_dir / "summary.json")
    assert summary["oom"] >= 1 and summary["tokens"] == 4
    assert len(read_csv(o.run_dir / "tokens.csv")) == 4
    assert any(e["kind"] == "oom" for e in read_csv(o.run_dir / "events.csv"))


def test_no_feasible_placement_ends_cleanly_as_infeasible(tmp_path: Path) -> None:
    """A co-tenant takes nearly everything everywhere: re-planning finds no placement, the
    run records `infeasible` and stops with its partial results."""
    scen = make_scenario(n_devices=2, new_tokens=8, memory_mib=2, algorithm="resource_aware",
                         events=[{"at_token": 3, "action": "memory_pressure", "device": d, "take_mib": 1.7}
                                 for d in ("src", "a")])
    o = run_virtual(scen, "resource_aware", tmp_path)
    assert o.status.startswith("failed: infeasible"), o.status
    assert any(e["kind"] == "infeasible" for e in read_csv(o.run_dir / "events.csv"))
    assert 0 < len(read_csv(o.run_dir / "tokens.csv")) < 8
    assert read_json(o.run_dir / "meta.json")["status"] == o.status
