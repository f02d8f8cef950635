"""Tensor-parallel plans for models with FFN shards (pure): the start that lets a search
reach fine-grained placements that single moves from a layer pipeline cannot.

`tensor_parallel(snap)` builds hybrid plans: the layers cut into S contiguous stages of
equal length (a pipeline, S = 1, 2, 4), each stage spread over its own group of k devices
(k = 2, 4, 8, 16). A group is a hub, the fastest device not yet taken, and the k - 1
devices (not yet taken) that would finish a 1/k share of a layer's head and FFN work
soonest counting the two link latencies to and from the hub. In a stage proj and ffn
shard 0 sit on the hub (proj's output reaches shard 0 without a hop, and the layer's output
leaves from there); the other shards are dealt one by one to the member where they would
finish first (its hops to and from the hub, plus its shards so far and this one at its
FLOP/s), among those with room, and the heads either dealt likewise ("full": attention
split too) or kept on the hub ("ffn": only the FFN split, two hops per layer instead of
four). A plan fills at most `HEADROOM` of each device's capacity. The candidate with the lowest per-token estimate
(`LatencyModel`) is returned; None when none fits. Galaxy and TPI-LLM split attention and
MLP this way; which S, k and variant win depends on compute against link latency, which
the estimate weighs.
"""

from __future__ import annotations

import math

import numpy as np

from ..model import cost
from .problem import LatencyModel, Placement, Snapshot, violations

STAGES = (1, 2, 4)
GROUP_SIZES = (2, 4, 8, 16)
# the share of a device's capacity a plan fills: a hub packed to its limit is pushed over it by
# the next rise of its co-tenants' load, and the forced re-plan then moves most of the model
HEADROOM = 0.85


def _groups(snap: Snapshot, model: LatencyModel, stages: int, k: int) -> list[list[int]] | None:
    """`stages` disjoint groups of k usable devices, hub first (None: not enough devices)."""
    s = snap.spec
    left = sorted((j for j, d in enumerate(snap.devices) if d.usable), key=lambda j: (-snap.devices[j].flops, j))
    if len(left) < stages * k:
        return None
    work = (s.groups * model.head_flops(snap.n_mid) + s.ffn_shards * model.ffn_flops) / k
    out = []
    for _ in range(stages):
        hub = left.pop(0)
        score = {j: model.hidden_t[hub, j] + model.hidden_t[j, hub] + work / model.flops[j] for j in left}
        members = sorted(left, key=lambda j: (score[j], j))[:k - 1]
        for j in members:
            left.remove(j)
        out.append([hub, *members])
    return out


def _plan(snap: Snapshot, model: LatencyModel, groups: list[list[int]], split_heads: bool) -> Placement | None:
    s = snap.spec
    need = {kind: cost.block_bytes(s, kind, snap.n_end) for kind in ("head", "proj", "ffn")}
    free = {j: HEADROOM * snap.devices[j].capacity for g in groups for j in g}
    unit = {"head": model.head_flops(snap.n_mid), "ffn": model.ffn_flops}
    assign: list[int] = []

    def deal(group: list[int], kind: str, count: int, first: int | None = None) -> bool:
        """`count` blocks of `kind`, each to the member of the group where the blocks dealt
        so far would finish first (hops to and from the hub included), with room."""
        hub = group[0]
        held = dict.fromkeys(group, 0)
        if first is not None:
            held[first] = 1
        for _ in range(count):
            fits = [j for j in group if free[j] >= need[kind]]
            if not fits:
                return False
            j = min(fits, key=lambda j: (model.hidden_t[hub, j] + model.hidden_t[j, hub]
                                         + (held[j] + 1) * unit[kind] / model.flops[j], j))
            free[j] -= need[kind]
            held[j] += 1
            assign.append(j)
        return True

    def put(group: list[int], kind: str) -> int | None:
        j = next((j for j in group if free[j] >= need[kind]), None)
        if j is not None:
            free[j] -= need[kind]
            assign.append(j)
        return j

    bounds = np.linspace(0, s.layers, len(groups) + 1).round().astype(int)
    for layer in range(s.layers):
        group = groups[int(np.searchsorted(bounds, layer, side="right")) - 1]
        if not deal(group if split_heads else group[:1], "head", s.groups):
            return None
        if put(group, "proj") is None or (f0 := put(group, "ffn")) is None:
            return None
        if not deal(group, "ffn", s.ffn_shards - 1, f0):
            return None
    return Placement(s, tuple(assign))


def tensor_parallel(snap: Snapshot) -> Placement | None:
    """The best hybrid tensor-parallel plan by the per-token estimate (None if none fits)."""
    model = LatencyModel(snap)
    best, best_t = None, math.inf
    for stages in STAGES:
        for k in GROUP_SIZES:
            groups = _groups(snap, model, stages, k)
            if groups is None:
                continue
            for split_heads in (False, True):
                p = _plan(snap, model, groups, split_heads)
                if p is None or violations(snap, p):
                    continue
                t = model.token_time(p, snap.n_mid)
                if t < best_t:
                    best, best_t = p, t
    return best
