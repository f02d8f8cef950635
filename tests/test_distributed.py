"""Distributed decoding over the emulated cluster equals the monolithic reference, for any
placement; virtual-clock runs are deterministic; the latency estimate matches the
emulation."""

from __future__ import annotations

import filecmp
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.experiments import run as experiment
from testbed.scenario import load

from .conftest import Fixed, fresh_dir, make_scenario, read_csv, read_json, run_virtual

ROOT = Path(__file__).resolve().parents[1]

_PREPARED: dict[tuple, experiment.Prepared] = {}


def prepared(preset: str, n_devices: int, new_tokens: int, prompt: int, seed: int = 0,
             **kw: object) -> experiment.Prepared:
    key = (preset, n_devices, new_tokens, prompt, seed, tuple(sorted(kw.items())))
    if key not in _PREPARED:
        scen = make_scenario(preset=preset, n_devices=n_devices, new_tokens=new_tokens, prompt=prompt,
                             seed=seed, memory_mib=4096, **kw)
        _PREPARED[key] = experiment.prepare(scen)
    return _PREPARED[key]


def check_correct(prep: experiment.Prepared, assign: list[int], tmp: Path) -> None:
    o = run_virtual(prep.scenario, Fixed(assign), tmp, prep)
    assert o.ok, o.status
    corr = read_json(o.run_dir / "summary.json")["correctness"]
    assert corr["tokens_match"], corr
    assert corr["max_abs_logit_diff"] <= 1e-4
    rows = read_csv(o.run_dir / "tokens.csv")
    assert [r["token_id"] for r in rows] == [str(i) for i in prep.ref_ids]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_placements_gpt_tiny(data: st.DataObject, tmp_path: Path) -> None:
    n_dev = data.draw(st.integers(1, 4), label="devices")
    prep = prepared("gpt-tiny", n_dev, new_tokens=5, prompt=data.draw(st.sampled_from([1, 3, 6])))
    assign = data.draw(st.lists(st.integers(0, n_dev - 1), min_size=len(prep.model.blocks),
                                max_size=len(prep.model.blocks)), label="placement")
    check_correct(prep, assign, fresh_dir(tmp_path))


# gpt-mini's attention variants: multi-head (8 groups of 1 query head), grouped-query with 4
# and 2 K/V groups (2 and 4 query heads each), multi-query (1 group of 8); each gets its own
# examples, so none depends on a draw
ATTENTION = {"mha": {}, "gqa4": {"kv_heads": 4}, "gqa2": {"kv_heads": 2}, "mqa": {"kv_heads": 1}}


@pytest.mark.parametrize("kind", list(ATTENTION))
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_placements_gpt_mini_attention_variants(kind: str, data: st.DataObject, tmp_path: Path) -> None:
    prep = prepared("gpt-mini", 3, new_tokens=4, prompt=5, **ATTENTION[kind])
    assert prep.model.groups == ATTENTION[kind].get("kv_heads", 8)
    assign = data.draw(st.lists(st.integers(0, 2), min_size=len(prep.model.blocks),
                                max_size=len(prep.model.blocks)))
    check_correct(prep, assign, fresh_dir(tmp_path))


def test_random_placement_gpt2_small(tmp_path: Path) -> None:
    import random

    prep = prepared("gpt2-small", 4, new_tokens=3, prompt=4)
    rng = random.Random(5)
    check_correct(prep, [rng.randrange(4) for _ in prep.model.blocks], tmp_path)


@pytest.mark.parametrize("preset", ["paper-small", "paper-medium"])
def test_paper_presets(preset: str, tmp_path: Path) -> None:
    prep = prepared(preset, 3, new_tokens=3, prompt=4)
    check_correct(prep, [i % 3 for i in range(len(prep.model.blocks))], tmp_path)


@pytest.mark.parametrize("name", ["steady", "bandwidth_drop", "memory_pressure"])
def test_virtual_runs_are_deterministic(name: str, tmp_path: Path) -> None:
    scen = load(ROOT / "scenarios" / f"{name}.yaml").with_overrides(new_tokens=32)
    prep = experiment.prepare(scen)
    a = run_virtual(scen, scen.controller.algorithm, tmp_path / "a", prep)
    b = run_virtual(scen, scen.controller.algorithm, tmp_path / "b", prep)
    assert a.status == b.status
    for f in ("tokens.csv", "placements.csv", "telemetry.csv", "links.csv"):
        assert filecmp.cmp(a.run_dir / f, b.run_dir / f, shallow=False), f
    # events are identical but for the wall-clock time each decision took
    strip = re.compile(r"decision_ms=[0-9.]+ ")
    ea, eb = ((a.run_dir / "events.csv").read_text(), (b.run_dir / "events.csv").read_text())
    assert strip.sub("", ea) == strip.sub("", eb)


def _fidelity(scen_prep: experiment.Prepared, alg: object, tmp: Path) -> list[float]:
    o = run_virtual(scen_prep.scenario, alg, tmp, scen_prep)
    assert o.ok, o.status
    rows = [r for r in read_csv(o.run_dir / "tokens.csv")]
    # the estimate is of the token's own pass: its stall (a decision's cost, migrations) is not
    own = [float(r["latency_ms"]) - float(r["stall_ms"]) for r in rows]
    return [abs(t - float(r["predicted_ms"])) / t for t, r in zip(own, rows, strict=True)]


@pytest.mark.parametrize("alg", ["static", "greedy", "round_robin", "resource_aware"])
def test_estimate_matches_emulation_steady(alg: str, tmp_path: Path) -> None:
    """Oracle telemetry, no events, virtual time: every token (prefill included) within 5 %."""
    scen = load(ROOT / "scenarios" / "steady.yaml")
    scen = scen.with_overrides(new_tokens=24)
    scen = type(scen)(**{**scen.__dict__, "controller": type(scen.controller)(
        algorithm=alg, interval_tokens=4, telemetry="oracle")})
    errors = _fidelity(experiment.prepare(scen), alg, tmp_path)
    assert max(errors) <= 0.05, max(errors)


@pytest.mark.parametrize("kind", ["mha", "gqa2"])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_estimate_matches_emulation_random_placements(kind: str, data: st.DataObject, tmp_path: Path) -> None:
    prep = prepared("gpt-mini", 4, new_tokens=6, prompt=8, latency_ms=0.5, **ATTENTION[kind])
    assign = data.draw(st.lists(st.integers(0, 3), min_size=len(prep.model.blocks), max_size=len(prep.model.blocks)))
    errors = _fidelity(prep, Fixed(assign), fresh_dir(tmp_path))
    assert max(errors) <= 0.05, max(errors)
