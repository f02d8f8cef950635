"""Placement algorithms and the latency estimate (pure)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.model import cost
from testbed.model.spec import from_name
from testbed.placement.problem import (
    DeviceState,
    Infeasible,
    LatencyModel,
    Placement,
    Snapshot,
    link_matrices,
    memory_need,
    migration_delay,
    violations,
)
from testbed.placement.registry import get_algorithm

ALGS = ["static", "greedy", "round_robin", "resource_aware"]


def snapshot(spec_name: str = "gpt-mini", flops: list[float] | None = None, mem: list[int] | None = None,
             rate_mbps: float = 100.0, lat_ms: float = 1.0, seq_len: int = 16, interval: int = 4,
             current: Placement | None = None) -> Snapshot:
    spec = from_name(spec_name)
    flops = flops or [8e9, 20e9, 3e9, 5e9]
    mem = mem or [64 << 20] * len(flops)
    devs = [DeviceState(f"d{i}", f, m) for i, (f, m) in enumerate(zip(flops, mem, strict=True))]
    links = link_matrices(len(flops), rate=rate_mbps * 1e6 / 8, latency=lat_ms / 1e3)
    return Snapshot.build(spec, devs, links, 0, seq_len, interval, current)


@pytest.mark.parametrize("alg", ALGS)
def test_algorithms_respect_memory(alg: str) -> None:
    spec = from_name("gpt-mini")
    total = sum(cost.block_bytes(spec, b, 20) for b in spec.blocks)
    snap = snapshot(mem=[total // 3, total // 2, total // 3, total // 4])
    p = get_algorithm(alg).place(snap)
    assert violations(snap, p) == []
    assert memory_need(snap, p).sum() == sum(cost.block_bytes(spec, b, snap.n_end) for b in spec.blocks)


@pytest.mark.parametrize("alg", ALGS)
def test_infeasible_is_reported(alg: str) -> None:
    with pytest.raises(Infeasible):
        get_algorithm(alg).place(snapshot(mem=[1000, 1000, 1000, 1000]))


def test_non_hosting_devices_get_nothing() -> None:
    snap = snapshot()
    devs = list(snap.devices)
    devs[1] = DeviceState("d1", 20e9, 64 << 20, host_blocks=False)
    snap = snap.with_(devices=tuple(devs))
    for alg in ALGS:
        assert 1 not in get_algorithm(alg).place(snap).assign, alg


def test_latency_of_everything_on_the_source() -> None:
    snap = snapshot()
    s = snap.spec
    p = Placement(s, (0,) * len(s.blocks))
    n = 17
    flops = sum(cost.decode_flops(s, b, n) for b in s.blocks) + cost.source_flops(s)
    assert LatencyModel(snap).token_time(p, n) == pytest.approx(flops / 8e9, rel=1e-12)


def test_latency_two_devices_by_hand() -> None:
    """Heads of every layer split between d0 and d1; proj and ffn on d0."""
    snap = snapshot(flops=[1e9, 1e9], rate_mbps=80, lat_ms=2)
    s = snap.spec
    assign = tuple((1 if b.kind == "head" and b.index % 2 else 0) for b in s.blocks)
    n = 10
    rate = 80e6 / 8
    x_t = cost.hidden_bytes(s) / rate + 2e-3
    h_t = cost.head_output_bytes(s, s.groups // 2) / rate + 2e-3
    head = cost.decode_flops(s, "head", n) / 1e9 * (s.groups // 2)
    layer = max(head, x_t + head + h_t) + (cost.decode_flops(s, "proj", n) + cost.decode_flops(s, "ffn", n)) / 1e9
    expect = s.layers * layer + cost.source_flops(s) / 1e9
    assert LatencyModel(snap).token_time(Placement(s, assign), n) == pytest.approx(expect, rel=1e-12)


def test_migration_delay_parallel_links_serial_on_one() -> None:
    snap = snapshot(rate_mbps=8, lat_ms=5)
    s = snap.spec
    b = s.blocks
    one = cost.block_bytes(s, b[0], snap.seq_len) + cost.FRAME_OVERHEAD
    assert migration_delay(snap, [(b[0], 0, 1)]) == pytest.approx(one / 1e6 + 5e-3)
    assert migration_delay(snap, [(b[0], 0, 1), (b[1], 0, 2)]) == pytest.approx(one / 1e6 + 5e-3)
    assert migration_delay(snap, [(b[0], 0, 1), (b[1], 0, 1)]) == pytest.approx(2 * one / 1e6 + 5e-3)
    assert migration_delay(snap, []) == 0.0


def test_down_link_is_infinitely_slow() -> None:
    snap = snapshot()
    snap.rate[0, 1] = 0.0
    s = snap.spec
    p = Placement(s, tuple(1 if b.kind == "ffn" else 0 for b in s.blocks))
    assert math.isinf(LatencyModel(snap).token_time(p, 5))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(1e9, 5e10), min_size=1, max_size=6), st.integers(0, 200), st.data())
def test_resource_aware_is_valid_and_replans_validly(flops: list[float], n: int, data: st.DataObject) -> None:
    """On clusters where the model fits on any one device, every plan and re-plan is valid."""
    spec = from_name("gpt-tiny")
    total = sum(cost.block_bytes(spec, b, n + 4) for b in spec.blocks)
    mems = data.draw(st.lists(st.integers(total, 4 * total), min_size=len(flops), max_size=len(flops)))
    snap = snapshot("gpt-tiny", flops=flops, mem=mems, seq_len=n)
    p = get_algorithm("resource_aware").place(snap)
    assert violations(snap, p) == []
    again = get_algorithm("resource_aware").place(snap.with_(current=p))
    assert violations(snap, again) == []


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 5), st.integers(0, 300), st.data())
def test_local_search_never_worse(n_dev: int, n: int, data: st.DataObject) -> None:
    """resource_aware_ls is never worse than resource_aware, nor than staying put."""
    from testbed.placement.local_search import ResourceAwareLS
    from testbed.placement.problem import epoch_objective

    flops = data.draw(st.lists(st.floats(5e8, 2e10), min_size=n_dev, max_size=n_dev))
    snap = snapshot("gpt-tiny", flops=flops, mem=[64 << 20] * n_dev, seq_len=n,
                    rate_mbps=data.draw(st.sampled_from([10.0, 100.0, 1000.0])),
                    lat_ms=data.draw(st.sampled_from([0.05, 1.0])))
    ra = get_algorithm("resource_aware").place(snap)
    ls = ResourceAwareLS().place(snap)
    assert epoch_objective(snap, ls) <= epoch_objective(snap, ra) + 1e-12
    current = Placement(snap.spec, tuple(data.draw(st.integers(0, n_dev - 1)) for _ in snap.spec.blocks))
    snap2 = snap.with_(current=current)
    ls2 = ResourceAwareLS().place(snap2)
    assert violations(snap2, ls2) == []
    assert epoch_objective(snap2, ls2) <= epoch_objective(snap2, current) + 1e-12


def test_replan_moves_only_when_it_pays() -> None:
    """The paper's rule: with a tiny interval nothing is worth moving; with a long one the
    same snapshot makes blocks move towards the faster device."""
    slow_fast = snapshot("gpt-tiny", flops=[1e8, 5e10], mem=[64 << 20] * 2, rate_mbps=1000, lat_ms=0.01)
    s = slow_fast.spec
    everything_on_slow = Placement(s, (0,) * len(s.blocks))
    short = get_algorithm("resource_aware").place(slow_fast.with_(current=everything_on_slow, interval=1, seq_len=2000))
    long = get_algorithm("resource_aware").place(slow_fast.with_(current=everything_on_slow, interval=10_000))
    assert len(everything_on_slow.moves(long)) > len(everything_on_slow.moves(short))


@pytest.mark.parametrize("name", ["gpt-tiny", "smollm2-135m"])
def test_block_layout_helpers_follow_the_block_order(name: str) -> None:
    s = from_name(name)
    for l in range(s.layers):
        heads, every = s.head_range(l), s.layer_range(l)
        assert [s.blocks[i] for i in heads] == [b for b in s.blocks if b.kind == "head" and b.layer == l]
        assert {s.blocks[i].layer for i in every} == {l} and len(every) == s.per_layer
        for g in range(s.groups):
            assert s.blocks[s.position("head", l, g)].name == f"head.{l}.{g}"
        assert s.blocks[s.position("proj", l)].name == f"proj.{l}"
        assert s.blocks[s.position("ffn", l)].name == f"ffn.{l}"
    assert s.layer_range(s.layers - 1).stop == len(s.blocks)


def test_link_matrices_and_the_snapshot_builder() -> None:
    rate, lat, burst = link_matrices(3, [(0, 2, 5.0, 0.5, 7.0)], rate=10.0, latency=0.1)
    assert list(np.diag(rate)) == [math.inf] * 3 and not np.diag(lat).any() and not np.diag(burst).any()
    assert (rate[0, 2], lat[0, 2], burst[0, 2]) == (5.0, 0.5, 7.0) and (rate[2, 0], lat[2, 0]) == (10.0, 0.1)
    snap = Snapshot.build(from_name("gpt-tiny"), [DeviceState(f"d{i}", 1e9, 1 << 20) for i in range(3)],
                          (rate, lat), 1, 5, 2)
    assert snap.burst.shape == (3, 3) and not snap.burst.any() and isinstance(snap.devices, tuple)
    assert (snap.source, snap.seq_len, snap.interval, snap.current) == (1, 5, 2, None)


_doubles = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan])


def _same(a: float, b: float) -> bool:
    """Equal, or both nan. The sign of a zero is not compared: numpy's maximum of 0.0 and
    -0.0 may be either, and zeros of either sign compare and add alike in a plan."""
    return (math.isnan(a) and math.isnan(b)) or a == b


@settings(max_examples=400, deadline=None)
@given(_doubles, _doubles, st.lists(_doubles, min_size=1, max_size=6))
def test_resource_awares_scalar_arithmetic_is_numpys(a: float, b: float, xs: list[float]) -> None:
    """`resource_aware.plan` works on Python lists of per-device figures; its division,
    maximum and argmin give numpy's answers (the placements depend on them, down to nan),
    up to the sign of a zero."""
    from testbed.placement import resource_aware as ra

    with np.errstate(all="ignore"):
        assert _same(ra._div(a, b), float(np.float64(a) / np.float64(b)))
        assert _same(ra._max(a, b), float(np.maximum(a, b)))
        assert ra._argmin(xs) == int(np.argmin(np.array(xs)))
        assert _same(ra._maxof(xs), float(np.array(xs).max()))


def _price_steps(snap: Snapshot, start: Placement, steps: int, rng: np.random.Generator) -> tuple[int, int]:
    """Random steps from `start`, each priced by the local search's state and checked against
    the state rebuilt with it; about a third applied. Returns (priced, refused)."""
    from testbed.placement import local_search as ls

    spec, V = snap.spec, snap.n_devices
    state = ls._State(snap, start)
    priced = refused = 0
    for _ in range(steps):
        n = len(spec.blocks)
        changes = {int(i): int(rng.integers(0, V)) for i in rng.choice(n, size=int(rng.integers(1, 4)), replace=False)}
        d = state.delta(changes)
        after = list(state.a)
        for i, j in changes.items():
            after[i] = j
        fresh = ls._State(snap, Placement(spec, tuple(after)))
        if d is None:
            refused += 1
            assert fresh.over, changes  # refused: the step leaves some device over its memory
            continue
        priced += 1
        assert not fresh.over
        assert d == pytest.approx(fresh.objective() - state.objective(), rel=1e-9, abs=1e-12)
        if rng.random() < 0.3:
            state.apply(changes)
            again = ls._State(snap, Placement(spec, tuple(state.a)))
            assert state.used == pytest.approx(again.used) and state.over == again.over
            assert state.mig == pytest.approx(again.mig) and state.layer_t == pytest.approx(again.layer_t)
            assert {k: t for t, k in state._slowest} == pytest.approx({k: t for t, k in again._slowest})
    return priced, refused


@pytest.mark.parametrize("name", ["gpt-mini", "smollm2-135m"])
@pytest.mark.parametrize("sharded", [False, True])
def test_the_local_searchs_incremental_step_prices_agree_with_a_fresh_state(name: str, sharded: bool) -> None:
    """`resource_aware_ls` prices a candidate step incrementally (the layers it touches, the
    links whose migration bytes it changes, the devices whose memory it changes). Each
    priced step must equal the objective of the state rebuilt with the step applied, minus
    the objective before, and be refused exactly when that state is over some device's
    memory (from a feasible start, and from one already over); after `apply`, the state must
    be the one rebuilt from its assignment."""
    from dataclasses import replace

    spec = from_name(name)
    if sharded:
        spec = replace(spec, ffn_shards=3)
    rng = np.random.default_rng(3)
    V, n = 4, len(spec.blocks)
    total = sum(cost.block_bytes(spec, b, 64) for b in spec.blocks)
    devs = [DeviceState(f"d{i}", float(rng.uniform(2e9, 2e10)), int(total * rng.uniform(0.26, 0.3))) for i in range(V)]
    rate, lat, _ = link_matrices(V, rate=50e6, latency=2e-3)
    current = Placement(spec, tuple(int(x) for x in rng.integers(0, V, n)))
    snap = Snapshot.build(spec, devs, (rate * rng.uniform(0.2, 1.0, (V, V)), lat), 0, 32, 16, current)
    # a start over d1's memory (half the blocks), which a few moves do not mend: a step that
    # moves other blocks between other devices is refused too
    over = Placement(spec, tuple(1 if i % 2 == 0 else (0, 2, 3)[i % 3] for i in range(n)))
    assert violations(snap, over)
    p1, r1 = _price_steps(snap, get_algorithm("resource_aware").place(snap), 300, rng)
    p2, r2 = _price_steps(snap, over, 100, rng)
    assert p1 > 20 and r1 > 5 and r2 > 5, (p1, r1, p2, r2)  # both outcomes met
