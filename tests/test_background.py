"""Background load in scenarios: the format (constants, series, seeded draws, history
before the run), what it resolves to per token, the emulator applying it before every token
in every kind of cluster, what a co-tenant past a device's memory does to a run, and the
planner's window over it. Bad values are in bad_scenarios.py (key paths, exit 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from testbed.experiments import run as experiment
from testbed.model import cost
from testbed.placement.problem import Placement, Snapshot
from testbed.scenario import loads, parse

from .bad_scenarios import VALID
from .conftest import Fixed, read_csv, read_json, run_virtual, scenario_dict

SECTION = """\
background_load:
  before_tokens: 2
  default: {memory: 0.1, compute: {uniform: [0.0, 0.3]}}
  devices:
    - {device: laptop, memory: [0.2, 0.4], compute: 0.5}
"""


def test_the_section_is_optional_and_old_files_stay_as_they_were() -> None:
    s = loads(VALID)
    assert s.background is None and s.controller.window_tokens == 1
    assert "background_load" not in s.to_dict()


def test_constants_series_and_draws_resolve_per_device_and_token() -> None:
    s = loads(VALID + SECTION)
    bg = s.background
    assert bg is not None and bg.before_tokens == 2
    assert parse(s.to_dict(), s.file) == s and loads(yaml.safe_dump(s.to_dict()), s.file) == s
    t = bg.table(s.seed, s.device_names, s.generation.new_tokens)
    assert set(t) == {"gw", "laptop", "phone"} and t["gw"].shape == (2 + 16, 2)
    # a series holds its last value after its end; a constant is constant
    assert t["laptop"][:, 0].tolist() == [0.2] + [0.4] * 17 and set(t["laptop"][:, 1]) == {0.5}
    # devices without an entry take the default: drawn anew at every token, within bounds
    for name in ("gw", "phone"):
        assert set(t[name][:, 0]) == {0.1}
        cpu = t[name][:, 1]
        assert ((cpu >= 0) & (cpu <= 0.3)).all() and len(set(cpu)) == len(cpu)
    assert not np.array_equal(t["gw"][:, 1], t["phone"][:, 1])  # a stream per device


def test_draws_follow_the_seed_and_not_the_run_length() -> None:
    s = loads(VALID + SECTION)
    bg = s.background
    assert bg is not None
    a = bg.table(0, s.device_names, 16)["gw"][:, 1]
    assert np.array_equal(a, bg.table(0, s.device_names, 16)["gw"][:, 1])  # deterministic
    assert np.array_equal(a[:10], bg.table(0, s.device_names, 8)["gw"][:, 1])  # a shorter run: a prefix
    assert not np.array_equal(a, bg.table(1, s.device_names, 16)["gw"][:, 1])  # another seed
    assert s.with_overrides(new_tokens=40).background == bg  # longer runs draw further


# ---------------------------------------------------------------------------- in the emulator

def _loaded(new_tokens: int = 6, **controller: object) -> dict:
    d = scenario_dict(n_devices=3, new_tokens=new_tokens, memory_mib=64, algorithm="static", interval=1)
    d["controller"].update(controller)
    d["background_load"] = {"before_tokens": 3, "devices": [
        {"device": "src", "memory": [0.1, 0.2, 0.3, 0.4, 0.5], "compute": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]},
        {"device": "a", "memory": {"uniform": [0.0, 0.5]}, "compute": {"uniform": [0.0, 0.9]}}]}
    return d


@pytest.mark.parametrize("how", [dict(clock="virtual"), dict(transport="ws", time_scale=10.0),
                                 dict(processes=True, time_scale=10.0)], ids=["inproc", "ws", "processes"])
def test_every_cluster_applies_the_load_before_every_token(how: dict, tmp_path: Path) -> None:
    scen = parse(_loaded(), "<bg>")
    prep = experiment.prepare(scen)
    how = {"clock": "real", **how}
    o = experiment.run(prep, Fixed([i % 3 for i in range(len(prep.model.blocks))]), tmp_path / "run", **how)
    assert o.ok, o.status
    bg = scen.background
    assert bg is not None
    table = bg.table(scen.seed, scen.device_names, scen.generation.new_tokens)
    rows = [r for r in read_csv(o.run_dir / "telemetry.csv") if float(r["t_s"]) > 0]  # after each token
    assert {int(r["token"]) for r in rows} == set(range(6))
    for r in rows:
        d, k = scen.device(r["device"]), int(r["token"])
        mem, cpu = table[d.name][bg.before_tokens + k]
        assert int(r["background_bytes"]) == int(mem * d.memory_bytes), (d.name, k)
        assert float(r["compute_gflops"]) == pytest.approx(d.compute_gflops * (1 - cpu), rel=1e-6), (d.name, k)
    assert {int(r["background_bytes"]) for r in rows if r["device"] == "b"} == {0}  # no entry, no default


def test_a_co_tenant_past_the_memory_refuses_the_next_append(tmp_path: Path) -> None:
    """The load takes a device's memory from under its blocks at token 3: a placement that
    does not re-plan fails there with the oom recorded; one that re-plans moves the blocks
    away (an oom emergency) and still generates the reference's tokens."""
    d = scenario_dict(n_devices=3, new_tokens=8, memory_mib=64, interval=4)
    d["devices"][1]["memory_mib"] = 1  # a: room for gpt-tiny's heads (about 0.1 MiB), not 99 % more
    d["background_load"] = {"devices": [{"device": "a", "memory": [0.0, 0.0, 0.0, 0.99]}]}
    scen = parse(d, "<squeeze>")
    prep = experiment.prepare(scen)
    heads_on_a = [1 if b.kind == "head" else 0 for b in prep.model.blocks]
    o = run_virtual(scen, Fixed(heads_on_a), tmp_path, prep)
    assert o.status.startswith("failed: out of memory on a at token 3"), o.status
    assert any(e["kind"] == "oom" and e["subject"] == "a" for e in read_csv(o.run_dir / "events.csv"))

    class Moves(Fixed):
        """Heads on a until an emergency, then on b."""

        dynamic = True

        def place(self, snap: Snapshot) -> Placement:
            if snap.devices[1].capacity < 1 << 19:  # the co-tenant came
                return Placement(snap.spec, tuple(2 if j == 1 else j for j in self.assign))
            return Placement(snap.spec, self.assign)

    o = run_virtual(scen, Moves(heads_on_a), tmp_path, prep)
    assert o.ok, o.status
    summary = read_json(o.run_dir / "summary.json")
    assert summary["oom"] >= 1 and summary["migrations"] > 0 and summary["correctness"]["tokens_match"]
    assert any("emergency:oom@a" in e["detail"] for e in read_csv(o.run_dir / "events.csv"))


class Watching:
    """A dynamic algorithm that keeps the compute and room it was shown at each decision."""

    name, dynamic = "watching", True

    def __init__(self) -> None:
        self.seen: list[tuple[float, int]] = []

    def place(self, snap: Snapshot) -> Placement:
        self.seen.append((snap.devices[0].flops, snap.devices[0].capacity))
        return Placement(snap.spec, tuple(0 for _ in snap.spec.blocks))


@pytest.mark.parametrize("window", [1, 3])
def test_the_planner_sees_the_window_of_the_load(window: int, tmp_path: Path) -> None:
    """Decisions at every token: the source's compute is the mean, and its room the least,
    over the last `window` tokens, the history before the run included."""
    scen = parse(_loaded(new_tokens=5, window_tokens=window), "<window>")
    prep = experiment.prepare(scen)
    alg = Watching()
    assert run_virtual(scen, alg, tmp_path, prep).ok
    bg = scen.background
    assert bg is not None
    t = bg.table(scen.seed, scen.device_names, scen.generation.new_tokens)["src"]
    src, fixed = scen.device("src"), cost.source_weight_bytes(prep.model)
    # one decision at deployment (token 0), then one per decode token
    assert len(alg.seen) == scen.generation.new_tokens
    for k, (flops, cap) in enumerate(alg.seen):
        rows = t[bg.before_tokens + k - window + 1: bg.before_tokens + k + 1]
        assert flops == pytest.approx(src.flops * float(np.mean(1 - rows[:, 1])), rel=1e-12), k
        assert cap == src.memory_high_bytes - fixed - int(rows[:, 0].max() * src.memory_bytes), k
