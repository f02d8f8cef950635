"""FFN shards (`model.ffn_shards`): the blocks `ffn.L.S` are slices of the layer's FFN, any
placement of any mix of blocks decodes the reference's tokens (logits within 1e-4), with
migrations too, on every random preset up to gpt2-small and on SmolLM2's real weights; a
shard count that does not divide d_ff is one clear error."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.experiments import run as experiment
from testbed.model import cost
from testbed.model.blocks import FfnBlock, RandomWeights, Reference, random_prompt, sum_partials
from testbed.model.spec import Block, ModelSpec, from_name
from testbed.placement import ALGORITHM_NAMES
from testbed.placement.problem import (
    DeviceState,
    Placement,
    Snapshot,
    estimate_token_latency,
    link_matrices,
    violations,
)
from testbed.placement.registry import get_algorithm
from testbed.placement.tensor_parallel import tensor_parallel
from testbed.scenario import ScenarioError, parse

from .conftest import Fixed, fresh_dir, make_scenario, scenario_dict
from .test_distributed import _fidelity, check_correct
from .test_optimal import check_against_exhaustive, instances
from .test_smollm2_partitioned import check_partitioned_run, needs_model, scripted_plans

_PREPARED: dict[tuple, experiment.Prepared] = {}


def prepared(preset: str, shards: int, n_devices: int, new_tokens: int, prompt: int) -> experiment.Prepared:
    key = (preset, shards, n_devices, new_tokens, prompt)
    if key not in _PREPARED:
        scen = make_scenario(preset=preset, n_devices=n_devices, new_tokens=new_tokens, prompt=prompt,
                             memory_mib=4096, ffn_shards=shards)
        _PREPARED[key] = experiment.prepare(scen)
    return _PREPARED[key]


# ---------------------------------------------------------------------------- the blocks


@pytest.mark.parametrize(("preset", "shards"), [("gpt-tiny", 4), ("gpt-mini", 8), ("smollm2-135m", 3)])
def test_shards_are_slices_whose_partials_sum_to_the_ffn(preset: str, shards: int) -> None:
    s = replace(from_name(preset), weights="random")
    sh = replace(s, ffn_shards=shards)
    whole, parts = RandomWeights(s, 3), RandomWeights(sh, 3)
    x = torch.randn(5, s.d_model, generator=torch.Generator().manual_seed(1))
    ffn = FfnBlock(s, whole.block("ffn.1"))
    blocks = [FfnBlock(sh, parts.block(f"ffn.1.{k}")) for k in range(shards)]
    y = x + sum_partials([b.partial(x) for b in blocks])
    assert torch.allclose(y, ffn.forward(x), atol=1e-5)
    # the down bias is on shard 0 only (GELU models): held twice, it would be added twice
    assert ["b2" in b.w for b in blocks] == ([s.mlp != "swiglu"] + [False] * (shards - 1))
    # each shard holds what the cost model says, exactly
    for k, b in enumerate(blocks):
        assert sum(t.nbytes for t in b.w.values()) == cost.weight_bytes(sh, Block.parse(f"ffn.1.{k}"))
    assert cost.ffn_layer_weight_bytes(sh) == sum(t.nbytes for b in blocks for t in b.w.values())
    assert cost.decode_flops(sh, "ffn", 1) * shards == cost.decode_flops(s, "ffn", 1)


def test_a_sharded_reference_is_the_unsharded_model() -> None:
    s = from_name("gpt-mini")
    prompt = random_prompt(s, 0, 6)
    ids, logits = Reference(RandomWeights(s, 0)).generate(prompt, 6)
    ids4, logits4 = Reference(RandomWeights(replace(s, ffn_shards=4), 0)).generate(prompt, 6)
    assert ids == ids4 and (logits - logits4).abs().max() <= 1e-4


def test_block_layout_with_shards() -> None:
    s = replace(from_name("gpt-tiny"), ffn_shards=4)
    names = [b.name for b in s.blocks]
    assert names[:9] == ["head.0.0", "head.0.1", "head.0.2", "head.0.3", "proj.0",
                         "ffn.0.0", "ffn.0.1", "ffn.0.2", "ffn.0.3"]
    assert len(names) == s.layers * s.per_layer and [names[i] for i in s.shard_range(1)] == [
        f"ffn.1.{k}" for k in range(4)]
    assert s.position("ffn", 1, 2) == names.index("ffn.1.2")
    assert Block.parse("ffn.1.2") == Block("ffn", 1, 2) and str(Block.parse("ffn.1.2")) == "ffn.1.2"
    assert [b.name for b in from_name("gpt-tiny").blocks][4:6] == ["proj.0", "ffn.0"]  # N = 1 unchanged


@pytest.mark.parametrize("shards", [3, 0, 5000])
def test_a_shard_count_that_does_not_divide_d_ff_is_one_clear_error(shards: int) -> None:
    with pytest.raises(ScenarioError) as info:
        parse(scenario_dict(ffn_shards=shards), "s.yaml")  # gpt-tiny: d_ff 256
    msg = str(info.value)
    assert "\n" not in msg and "model.ffn_shards" in msg and "s.yaml" in msg, msg


# ---------------------------------------------------------------------------- any placement


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_placements_with_shards_gpt_tiny(data: st.DataObject, tmp_path: Path) -> None:
    shards = data.draw(st.sampled_from([2, 4, 8]), label="shards")
    n_dev = data.draw(st.integers(2, 4), label="devices")
    prep = prepared("gpt-tiny", shards, n_dev, new_tokens=4, prompt=data.draw(st.sampled_from([1, 4])))
    assign = data.draw(st.lists(st.integers(0, n_dev - 1), min_size=len(prep.model.blocks),
                                max_size=len(prep.model.blocks)), label="placement")
    check_correct(prep, assign, fresh_dir(tmp_path))


@pytest.mark.parametrize(("preset", "shards"), [("gpt-mini", 4), ("paper-small", 8), ("paper-medium", 2)])
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_placements_with_shards_other_presets(preset: str, shards: int, data: st.DataObject,
                                                    tmp_path: Path) -> None:
    prep = prepared(preset, shards, 3, new_tokens=3, prompt=4)
    assign = data.draw(st.lists(st.integers(0, 2), min_size=len(prep.model.blocks),
                                max_size=len(prep.model.blocks)), label="placement")
    check_correct(prep, assign, fresh_dir(tmp_path))


def test_random_placement_with_shards_gpt2_small(tmp_path: Path) -> None:
    prep = prepared("gpt2-small", 4, 4, new_tokens=3, prompt=4)
    rng = random.Random(7)
    check_correct(prep, [rng.randrange(4) for _ in prep.model.blocks], tmp_path)


def test_shards_migrate_with_the_reference_tokens(tmp_path: Path) -> None:
    scen = make_scenario(preset="gpt-mini", n_devices=4, new_tokens=8, prompt=4, memory_mib=4096,
                         ffn_shards=4, interval=2)
    prep = experiment.prepare(scen)
    plans = scripted_plans(prep.model, 4, epochs=3, seed=2, moves=12)
    summary = check_partitioned_run(prep, plans, tmp_path / "run")
    assert summary["migrations"] > 0


@needs_model
def test_smollm2_with_shards_and_migrations_equals_reference(tmp_path: Path) -> None:
    d = scenario_dict(preset="smollm2-135m", n_devices=4, new_tokens=5, prompt=4, memory_mib=1024,
                      interval=2, ffn_shards=4)
    prep = experiment.prepare(parse(d, "<test>"))
    assert prep.model.weights == "smollm2" and prep.model.ffn_shards == 4
    plans = scripted_plans(prep.model, 4, epochs=3, seed=4, moves=20)
    check_partitioned_run(prep, plans, tmp_path / "run")


# ---------------------------------------------------------------------------- the estimate


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_estimate_matches_emulation_with_shards(data: st.DataObject, tmp_path: Path) -> None:
    """The estimator's per-token latency (partial sums to shard 0's device included) is the
    emulator's within 5 % on random placements (virtual clock, oracle telemetry)."""
    scen = make_scenario(preset="gpt-mini", n_devices=4, new_tokens=6, prompt=8, memory_mib=4096,
                         latency_ms=0.5, ffn_shards=4)
    if ("fidelity",) not in _PREPARED:
        _PREPARED[("fidelity",)] = experiment.prepare(scen)
    prep = _PREPARED[("fidelity",)]
    assign = data.draw(st.lists(st.integers(0, 3), min_size=len(prep.model.blocks), max_size=len(prep.model.blocks)))
    errors = _fidelity(prep, Fixed(assign), fresh_dir(tmp_path))
    assert max(errors) <= 0.05, max(errors)


# ---------------------------------------------------------------------------- every algorithm


def _snapshot(spec: ModelSpec, n: int = 6, gflops: tuple[float, ...] = (8, 20, 3, 5, 12, 2)) -> Snapshot:
    devs = [DeviceState(f"d{j}", gflops[j] * 1e9, 1 << 30) for j in range(n)]
    return Snapshot.build(spec, devs, link_matrices(n, rate=1e9 / 8, latency=0.1e-3), 0, 16, 4)


@pytest.mark.parametrize("alg", [a for a in ALGORITHM_NAMES if a != "optimal"])
def test_every_algorithm_places_shards(alg: str, tmp_path: Path) -> None:
    spec = replace(from_name("gpt-mini"), ffn_shards=4)
    snap = _snapshot(spec)
    p = get_algorithm(alg).place(snap)
    assert len(p.assign) == len(spec.blocks) and violations(snap, p) == []
    est = estimate_token_latency(snap, p)
    assert 0 < est < 1.0
    shards = [[p.assign[i] for i in spec.shard_range(l)] for l in range(spec.layers)]
    if alg.startswith("layer_dp"):  # whole layers: every shard with its layer's proj
        assert all(set(sh) == {p.assign[spec.position("proj", l)]} for l, sh in enumerate(shards))
    if alg == "equal_split":  # the tensor-parallel baseline deals shards like heads, fastest first
        order = sorted(range(6), key=lambda j: -snap.devices[j].flops)
        assert all(sh == order[:4] for sh in shards), shards
    # and the placement decodes the reference's tokens in the emulator
    prep = prepared("gpt-mini", 4, 4, new_tokens=3, prompt=4)
    four = _snapshot(spec, 4)
    check_correct(prep, list(get_algorithm(alg).place(four).assign), fresh_dir(tmp_path))


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_optimal_counts_shards_and_equals_exhaustive(data: st.DataObject) -> None:
    """The exact solver with shard counts per device: the minimum of the epoch objective over
    every explicit assignment (tests/test_optimal.py's exhaustive check), migrations too."""
    snap = data.draw(instances(devices=(2, 3), layers=(1, 1), groups=(1, 2), enum_limit=None))
    shards = data.draw(st.sampled_from([2, 3]))
    spec = replace(snap.spec, ffn_shards=shards, d_ff=shards * 16)
    if len(spec.blocks) * math.log(snap.n_devices) > math.log(6561):
        spec = replace(spec, heads=spec.heads // spec.kv_heads, kv_heads=1, d_model=spec.d_model // spec.kv_heads)
    cur = snap.current
    if cur is not None:
        cur = Placement(spec, tuple(data.draw(st.integers(0, snap.n_devices - 1)) for _ in spec.blocks))
    check_against_exhaustive(snap.with_(spec=spec, current=cur), record=False)


def test_shards_spread_the_ffn_where_layers_cannot() -> None:
    """Four equal slow devices on fast, low-latency links, a model whose FFN dominates:
    dealing the shards over the devices beats keeping each layer's FFN whole."""
    spec = replace(from_name("gpt-mini"), d_ff=8 * 256, ffn_shards=4)
    snap = _snapshot(spec, 4, (2, 2, 2, 2))
    whole = replace(spec, ffn_shards=1)
    t_layers = estimate_token_latency(snap.with_(spec=whole), get_algorithm("layer_dp").place(snap.with_(spec=whole)))
    t_heads = estimate_token_latency(snap.with_(spec=whole),
                                     get_algorithm("resource_aware_ls").place(snap.with_(spec=whole)))
    t_shards = estimate_token_latency(snap, get_algorithm("resource_aware_ls").place(snap))
    # measured: 3.53 ms against 5.80 ms for layer_dp and for heads alone (their best plan is whole layers)
    assert t_shards < 0.65 * t_layers and t_shards < 0.85 * t_heads, (t_shards, t_heads, t_layers)


def test_tensor_parallel_start_spreads_each_layer_from_a_hub() -> None:
    """The search's tensor-parallel start (placement/tensor_parallel.py): proj and shard 0
    together, the shards of a layer over several devices, memory respected, and an estimate
    below the layer pipeline's on equal slow devices with fast links."""
    spec = replace(from_name("gpt-mini"), d_ff=8 * 256, ffn_shards=8)
    snap = _snapshot(spec, 6, (2, 2, 2, 2, 2, 2))
    p = tensor_parallel(snap)
    assert p is not None and violations(snap, p) == []
    for l in range(spec.layers):
        assert p.assign[spec.position("ffn", l)] == p.assign[spec.position("proj", l)]
        assert len({p.assign[i] for i in spec.shard_range(l)}) >= 2
    whole = snap.with_(spec=replace(spec, ffn_shards=1))
    assert estimate_token_latency(snap, p) < estimate_token_latency(whole, get_algorithm("layer_dp").place(whole))


# ---------------------------------------------------------------------------- the committed sweep


def test_the_committed_speedup_map_is_what_this_code_computes() -> None:
    """results/paper/ffn/ (`python -m runners.sweep ffn`): the gpt2-small cells at 0.05 ms
    are recomputed here (analytic mode is deterministic) and equal the committed rows, and
    the summary and README are what the report code makes of the committed CSVs."""
    import csv

    from runners import sweep as cli
    from testbed.experiments import ffn_report

    out = Path(__file__).resolve().parents[1] / "results" / "paper" / "ffn"
    committed = list(csv.DictReader(open(out / "map.csv")))
    for bw in ("large", "small"):
        want = [r for r in committed if (r["model"], r["bandwidth_class"], r["latency_ms"]) == ("gpt2-small", bw, "0.05")]
        assert want
        got = []
        for i in sorted({int(r["instance"]) for r in want}):
            got += cli._job("ffnmap", cli.FFN_MAP_DEVICES, "gpt2-small", i, 0, cli.FFN_MAP_RUNS[1], 4,
                            cli.FFN_MAP_ALGS, False, 0.05, bw)
        rows, _ = cli.split_timing(got)
        rows.sort(key=lambda r: (r["instance"], r["algorithm"]))
        want.sort(key=lambda r: (int(r["instance"]), r["algorithm"]))
        for g, w in zip(rows, want, strict=True):
            assert {k: (f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in g.items()} == w
    summary = list(csv.DictReader(open(out / "map_summary.csv")))
    typed = [{**r, "latency_ms": float(r["latency_ms"]), "instance": int(r["instance"]),
              "latency_mean_ms": float(r["latency_mean_ms"]), "oom": int(r["oom"])} for r in committed]
    again = ffn_report.map_table(typed)  # from the CSV's 6 significant digits: equal to about 1e-5
    assert len(again) == len(summary)
    for a, w in zip(again, summary, strict=True):
        assert set(a) == set(w)
        for k, v in a.items():
            assert (v == pytest.approx(float(w[k]), rel=2e-5)) if isinstance(v, float) else str(v) == w[k], (k, v, w[k])


def test_recovery_and_migration_with_shards(tmp_path: Path) -> None:
    """device_failure.yaml with the FFN in 4 shards: the lost device's shards are re-placed,
    the run recovers and decodes the reference's tokens; shards migrate like other blocks."""
    import dataclasses

    from testbed.scenario import load

    from .conftest import read_csv

    scen = load(Path(__file__).resolve().parents[1] / "scenarios" / "device_failure.yaml")
    scen = dataclasses.replace(scen, model=dataclasses.replace(scen.model, ffn_shards=4))
    o = experiment.run(experiment.prepare(scen), "resource_aware", tmp_path / "run", clock="virtual")
    assert o.ok and o.summary["correctness"]["tokens_match"], o.status
    events = read_csv(o.run_dir / "events.csv")
    assert any(e["kind"] == "recovered" for e in events)
    assert any(e["kind"] == "migration" and Block.parse(e["subject"]).kind == "ffn" and e["subject"].count(".") == 2
               for e in events)


# ---------------------------------------------------------------------------- computing early


def test_early_sums_are_the_joins_sums_once_per_content() -> None:
    """`EarlySums` (shard 0's device, content ahead of its frames): complete when the residual
    and every shard's partial are in, with exactly the bits of the sum `ShardJoin` makes at
    arrival; the same content again (handed on when computed, then when its window opens)
    completes nothing; other content for shards that are in replaces theirs (a regrouping
    counts no shard twice) and completes again; bounded, dropped at a floor or once summed."""
    from testbed.agents.shards import EarlySums, ShardJoin

    g = torch.Generator().manual_seed(0)
    x, a, b, c = (torch.randn(3, 8, generator=g) for _ in range(4))
    join = ShardJoin(4, 8)
    join.add_residual((1, 0), "d0", None, x)
    join.add_partial((1, 0), "d0", None, (0,), a)
    join.add_partial((1, 0), "d1", None, (1, 2), b)
    join.add_partial((1, 0), "d2", None, (3,), c)
    want = join.take((1, 0)).output()

    sums = EarlySums(4, limit=3)
    assert sums.add_partial((1, 0), (3,), c) is None and sums.add_partial((1, 0), (1, 2), b) is None
    assert sums.add_residual((1, 0), x) is None and sums.add_residual((1, 0), x.clone()) is None
    got = sums.add_partial((1, 0), (0,), a)
    assert got is not None and torch.equal(got.output(), want)  # the same bits
    assert sums.add_partial((1, 0), (1, 2), b.clone()) is None  # the same content twice: once
    again = sums.add_partial((1, 0), (1, 2), b + 1)  # computed again, other content: replaced
    assert again is not None and torch.equal(again.output(), x + sum_partials([a, b + 1, c]))
    # regrouped: (2, 3) replaces both the (1, 2) and the (3,) sums; shard 1 is missing now
    assert sums.add_partial((1, 0), (2, 3), c) is None
    regrouped = sums.add_partial((1, 0), (1,), b)
    assert regrouped is not None and torch.equal(regrouped.output(), x + sum_partials([a, b, c]))
    for seq in (2, 3, 4):  # bounded: the oldest goes
        sums.add_residual((seq, 0), x)
    assert len(sums) == 3 and sums.add_partial((1, 0), (0, 1, 2, 3), a) is None  # (1, 0) is new again
    sums.forget((1, 0))
    sums.drop_through(3)
    assert len(sums) == 1
