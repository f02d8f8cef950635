"""Layer-level baselines (placement/layer_based.py): layer_dp, layer_dp_dynamic, equal_split."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from testbed.model import cost
from testbed.model.spec import from_name
from testbed.placement.layer_based import (
    EqualSplit,
    LayerDP,
    LayerDPDynamic,
    device_order,
    layer_dp,
)
from testbed.placement.problem import (
    DeviceState,
    Infeasible,
    LatencyModel,
    Placement,
    Snapshot,
    epoch_objective,
    layer_views,
    violations,
)
from tests.test_optimal import instances, make_snapshot, tiny_spec


def ranges_of(p: Placement) -> list[tuple[int, int, int]]:
    """(device, first layer, end layer) of a whole-layer placement; asserts whole layers."""
    out: list[tuple[int, int, int]] = []
    for l, v in enumerate(layer_views(p)):
        devs = set(v.heads) | {v.proj, v.ffn}
        assert len(devs) == 1, f"layer {l} is split over {devs}"
        (j,) = devs
        if out and out[-1][0] == j:
            out[-1] = (j, out[-1][1], l + 1)
        else:
            out.append((j, l, l + 1))
    return out


def check_layer_plan(snap: Snapshot, p: Placement, value: float) -> None:
    assert violations(snap, p) == []
    ranges = ranges_of(p)
    devices = [j for j, _, _ in ranges]
    assert len(devices) == len(set(devices)), f"a device holds two ranges: {ranges}"
    order = device_order(snap)
    assert [order.index(j) for j in devices] == sorted(order.index(j) for j in devices)
    assert value == pytest.approx(LatencyModel(snap).token_time(p, snap.n_mid), rel=1e-12)


def brute_force(snap: Snapshot) -> float:
    """Minimum token_time over every split into contiguous ranges on devices taken in
    `device_order` (each device at most once), with memory respected."""
    L, order, best = snap.spec.layers, device_order(snap), math.inf
    model = LatencyModel(snap)
    per = snap.spec.per_layer
    for r in range(1, min(L, len(order)) + 1):
        for devs in itertools.combinations(order, r):
            for cuts in itertools.combinations(range(1, L), r - 1):
                bounds = [0, *cuts, L]
                assign: list[int] = []
                for j, a, b in zip(devs, bounds, bounds[1:], strict=False):
                    assign += [j] * ((b - a) * per)
                p = Placement(snap.spec, tuple(assign))
                if not violations(snap, p):
                    best = min(best, model.token_time(p, snap.n_mid))
    return best


@settings(max_examples=80, deadline=None)
@given(instances(devices=(1, 3), layers=(1, 3), groups=(1, 4), enum_limit=None, with_current=False, mem=(0.3, 1.5)))
def test_layer_dp_equals_brute_force(snap: Snapshot) -> None:
    best = brute_force(snap)
    event("feasible" if math.isfinite(best) else "infeasible")
    if not math.isfinite(best):
        with pytest.raises(Infeasible):
            layer_dp(snap)
        return
    p, value = layer_dp(snap)
    check_layer_plan(snap, p, value)
    assert value == pytest.approx(best, rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["gpt-tiny", "gpt-mini", "gpt2-small"]), st.integers(1, 8), st.data())
def test_layer_dp_is_valid_on_presets(preset: str, n_dev: int, data: st.DataObject) -> None:
    spec = from_name(preset)
    n = data.draw(st.integers(0, 200))
    total = sum(cost.block_bytes(spec, b, n + 8) for b in spec.blocks)
    flops = [10 ** data.draw(st.floats(9, 11)) for _ in range(n_dev)]
    caps = [int(total * data.draw(st.floats(0.05, 1.2))) for _ in range(n_dev)]
    rate = 10 ** np.array([[data.draw(st.floats(6, 9)) for _ in range(n_dev)] for _ in range(n_dev)])
    snap = make_snapshot(spec, flops, caps, rate, np.full((n_dev, n_dev), 1e-3), seq_len=n, interval=8,
                         source=data.draw(st.integers(0, n_dev - 1)))
    try:
        p, value = layer_dp(snap)
    except Infeasible:
        return
    check_layer_plan(snap, p, value)


def test_device_order_and_plan_by_hand() -> None:
    """Source first, then by decreasing FLOP/s (ties by index); with memory for half the
    model on each device, the (nearly fastest) source takes the first half and the first of
    the fastest devices the rest."""
    spec = from_name("gpt-mini")
    total = sum(cost.block_bytes(spec, b, 24) for b in spec.blocks)
    V = 4
    snap = make_snapshot(spec, [8e9, 2e10, 1.5e10, 2e10], [total // 2 + 1] * V, np.full((V, V), 1e8),
                         np.full((V, V), 1e-4), source=2, seq_len=16, interval=8)
    assert device_order(snap) == [2, 1, 3, 0]
    p, _ = layer_dp(snap)
    assert ranges_of(p) == [(2, 0, 2), (1, 2, 4)]


def test_layer_dp_scales() -> None:
    """32 layers x 48 devices in well under a second."""
    spec = from_name("gpt-32x32")
    rng = np.random.default_rng(0)
    V = 48
    layer = sum(cost.block_bytes(spec, b, 600) for b in spec.blocks) // spec.layers
    snap = make_snapshot(spec, list(10 ** rng.uniform(10, 11, V)), [int(layer * x) for x in rng.uniform(0.5, 6, V)],
                         10 ** rng.uniform(7, 9, (V, V)), rng.uniform(1e-4, 5e-3, (V, V)), seq_len=512, interval=64)
    t0 = time.perf_counter()
    p, value = layer_dp(snap)
    assert time.perf_counter() - t0 < 0.5
    check_layer_plan(snap, p, value)


def test_layer_dp_dynamic_adopts_only_when_it_pays() -> None:
    spec = tiny_spec(2, 2)
    V = 2
    rate, lat = np.full((V, V), 1e5), np.full((V, V), 1e-3)
    snap = make_snapshot(spec, [1e6, 1e8], [1 << 30] * V, rate, lat, interval=1)
    alg = LayerDPDynamic()
    first = alg.place(snap)
    assert first == LayerDP().place(snap)
    slow = Placement(spec, (0,) * len(spec.blocks))
    short, long = snap.with_(current=slow, interval=1), snap.with_(current=slow, interval=10_000)
    assert alg.place(short) == slow  # moving costs more than it saves
    new = alg.place(long)
    assert new != slow and epoch_objective(long, new) < epoch_objective(long, slow)
    # the current placement no longer fits: adopt the plan whatever it costs
    need = sum(cost.block_bytes(spec, b, short.n_end) for b in spec.blocks)
    cramped = short.with_(devices=(DeviceState("d0", 1e6, need // 2), short.devices[1]))
    moved = alg.place(cramped)
    assert violations(cramped, moved) == [] and moved != slow
    nowhere = cramped.with_(devices=tuple(DeviceState(d.name, d.flops, need // 3) for d in cramped.devices))
    with pytest.raises(Infeasible):
        alg.place(nowhere)


@settings(max_examples=40, deadline=None)
@given(instances(devices=(1, 6), layers=(1, 4), groups=(1, 6), enum_limit=None))
def test_equal_split_is_valid(snap: Snapshot) -> None:
    try:
        p = EqualSplit().place(snap)
    except Infeasible:
        return
    assert violations(snap, p) == []


def test_equal_split_by_hand() -> None:
    """Heads dealt fastest first, evenly; proj and ffn on the fastest device with room."""
    spec = from_name("gpt-mini")  # 8 heads per layer
    V = 3
    rate, lat = np.full((V, V), 1e8), np.full((V, V), 1e-4)
    snap = make_snapshot(spec, [1e9, 5e9, 2e9], [1 << 30] * V, rate, lat)
    p = EqualSplit().place(snap)
    for v in layer_views(p):
        assert v.heads == {1: 3, 2: 3, 0: 2}
        assert v.proj == v.ffn == 1
    # the fastest device has room for three heads only: layer 0's proj and ffn go to the
    # next fastest, later layers' heads skip it
    head = cost.block_bytes(spec, "head", snap.n_end)
    devs = list(snap.devices)
    devs[1] = DeviceState("d1", 5e9, 3 * head)
    p = EqualSplit().place(snap.with_(devices=tuple(devs)))
    assert violations(snap.with_(devices=tuple(devs)), p) == []
    views = layer_views(p)
    assert views[0].proj == views[0].ffn == 2
    assert views[0].heads == {1: 3, 2: 3, 0: 2}
    assert all(v.heads == {2: 4, 0: 4} and v.proj == v.ffn == 2 for v in views[1:])
    with pytest.raises(Infeasible):
        EqualSplit().place(snap.with_(devices=tuple(DeviceState(d.name, d.flops, head) for d in devs)))
