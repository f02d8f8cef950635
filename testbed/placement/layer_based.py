"""Layer-level baselines: `layer_dp`, `layer_dp_dynamic` (EdgeShard-style pipelines) and
`equal_split` (distributed-llama/Galaxy-style tensor parallel heads). Pure: numpy only.

`layer_dp` keeps every block of a layer (all heads, proj, ffn) on one device and gives each
device at most one contiguous range of layers. It picks the ranges by dynamic programming
over (layers placed, device of the last range), minimising the per-token latency of that
pipeline under `LatencyModel`: x starts at the source; a range costs its layers' decode
FLOPs at `n_mid` on its device (the heads of a layer run one after another) plus one hidden
state transfer from the previous range's device; the tail returns x to the source, which
runs the LM head. A range must fit its device with caches grown to `n_end`.

Simplification: devices are visited in one fixed order (the source first, then by
decreasing FLOP/s, ties by index), i.e. the first layers go to the source or to faster
devices. EdgeShard's DP searches device orders as well; searching over every order is a
travelling-salesman-like problem, and with the fixed order the DP is exact within that
order and O(V (L^2 + L V)) (well under a millisecond for 32 layers x 48 devices).

`layer_dp_dynamic` recomputes that plan at every decision epoch and adopts it when it lowers
the epoch objective (migration delay included), or when the current placement no longer fits.

`equal_split` is tensor parallelism over every usable device: blocks in model order; each
layer's heads dealt in turn over the devices by decreasing FLOP/s (starting again at the
fastest for every layer, skipping a device without room), proj on the fastest device with
room, and the layer's ffn shards dealt like its heads (one ffn: the fastest device with
room). Neither looks at links.

With ffn shards `layer_dp` still keeps whole layers: all shards of a layer with its heads
and proj, run as one job on that device.
"""

from __future__ import annotations

import math

import numpy as np

from ..model import cost
from .problem import Infeasible, LatencyModel, Placement, Snapshot, epoch_objective, violations


def device_order(snap: Snapshot) -> list[int]:
    """Usable devices: the source first (if usable), then by decreasing FLOP/s, ties by index."""
    rest = sorted((j for j, d in enumerate(snap.devices) if d.usable and j != snap.source),
                  key=lambda j: (-snap.devices[j].flops, j))
    return ([snap.source] if snap.devices[snap.source].usable else []) + rest


def link_times(model: LatencyModel, times: np.ndarray | None = None) -> np.ndarray:
    """`hidden_t` (or `times`, another of the model's transfer matrices such as `tail_t`)
    with every down link (rate <= 0) at inf, as `xfer_time` has it (the matrix itself holds
    nan there when the burst covers the frame)."""
    h = (model.hidden_t if times is None else times).copy()
    down = model.rate <= 0
    np.fill_diagonal(down, False)
    h[down] = math.inf
    return h


def layer_ranges(snap: Snapshot) -> tuple[list[tuple[int, int, int]], float]:
    """The DP: ([(device, first layer, end layer), ...] in pipeline order, per-token latency).
    Raises Infeasible when no partition in the device order fits (over links that are up)."""
    s = snap.spec
    L = s.layers
    model = LatencyModel(snap)
    order = device_order(snap)
    if not order:
        raise Infeasible("layer_dp: no device may host blocks")
    dev = np.array(order)
    K = len(order)
    N = s.ffn_shards  # a layer's ffn shards (1: its ffn), one job on the layer's device
    layer_flops = s.groups * model.head_flops(snap.n_mid) + model.proj_flops + N * model.ffn_flops
    layer_bytes = (s.groups * cost.block_bytes(s, "head", snap.n_end) + cost.block_bytes(s, "proj", snap.n_end)
                   + N * cost.block_bytes(s, "ffn", snap.n_end))
    if model.bound:  # each job on the roofline: the layer's heads as one job, proj, ffn
        comp = (model.times(s.groups * model.head_flops(snap.n_mid), s.groups * model.head_bytes_moved(snap.n_mid))
                + model.times(model.proj_flops, model.proj_bytes)
                + model.times(N * model.ffn_flops, N * model.ffn_bytes))[dev]
    else:
        comp = layer_flops / model.flops[dev]  # [K] seconds per layer
    max_layers = [min(L, snap.devices[j].capacity // layer_bytes) for j in order]
    H = link_times(model)
    Hd = H[np.ix_(dev, dev)]  # [K, K]
    src = snap.source

    kk = np.arange(L + 1)
    span = kk[None, :] - kk[:, None]  # [k, k']: layers k .. k'-1 form a range
    best = np.full((L + 1, K), math.inf)  # first k layers placed, the last range on order[i]
    from_k = np.zeros((L + 1, K), dtype=np.int64)
    from_i = np.full((L + 1, K), -1, dtype=np.int64)  # previous range's device (-1: the start)
    for i in range(K):
        # cost of x being ready after k layers and then reaching order[i]
        enter = np.full(L + 1, math.inf)
        prev = np.full(L + 1, -1, dtype=np.int64)
        if i:
            via = best[:, :i] + Hd[:i, i][None, :]  # [k, previous device]
            prev = via.argmin(axis=1)
            enter = via[kk, prev]
        enter[0], prev[0] = H[src, dev[i]], -1  # the first range: x comes from the source
        ok = (span >= 1) & (span <= max_layers[i])
        with np.errstate(invalid="ignore"):
            cand = np.where(ok, enter[:, None] + span * comp[i], math.inf)
        k0 = cand.argmin(axis=0)
        best[:, i] = cand[k0, kk]
        from_k[:, i] = k0
        from_i[:, i] = prev[k0]
    total = best[L] + link_times(model, model.tail_t)[dev, src] + model.lm_time
    i = int(total.argmin())
    if not math.isfinite(total[i]):
        raise Infeasible(f"layer_dp: no partition into contiguous layer ranges fits ({L} layers of "
                         f"{layer_bytes} B each) over links that are up")
    ranges, k = [], L
    while k > 0:
        k0 = int(from_k[k, i])
        ranges.append((order[i], k0, k))
        i, k = int(from_i[k, i]), k0
    return ranges[::-1], float(total.min())


def layer_placement(snap: Snapshot, ranges: list[tuple[int, int, int]]) -> Placement:
    s = snap.spec
    assign = [0] * len(s.blocks)
    for j, a, b in ranges:  # layers a..b-1 on device j
        first, last = s.layer_range(a), s.layer_range(b - 1)
        assign[first.start:last.stop] = [j] * (last.stop - first.start)
    return Placement(snap.spec, tuple(assign))


def layer_dp(snap: Snapshot) -> tuple[Placement, float]:
    """The DP placement and its per-token latency at `n_mid` (ignores `snap.current`)."""
    ranges, t = layer_ranges(snap)
    return layer_placement(snap, ranges), t


class LayerDP:
    """EdgeShard-style layer pipeline, planned once."""

    name = "layer_dp"
    dynamic = False

    def place(self, snap: Snapshot) -> Placement:
        return layer_dp(snap)[0]


class LayerDPDynamic:
    """The DP plan at every epoch, adopted only when it lowers the epoch objective or the
    current placement no longer fits."""

    name = "layer_dp_dynamic"
    dynamic = True

    def place(self, snap: Snapshot) -> Placement:
        if snap.current is None:
            return layer_dp(snap)[0]
        stuck = bool(violations(snap, snap.current))
        try:
            new = layer_dp(snap)[0]
        except Infeasible:
            if stuck:
                raise
            return snap.current
        if stuck:
            return new
        model = LatencyModel(snap)
        if epoch_objective(snap, new, model) < epoch_objective(snap, snap.current, model):
            return new
        return snap.current


class EqualSplit:
    """Every layer's heads dealt over all usable devices (fastest first, skipping a device
    without room); proj on the fastest device with room; the ffn shards dealt like the
    heads (an unsharded ffn: on the fastest device with room). Planned once."""

    name = "equal_split"
    dynamic = False

    def place(self, snap: Snapshot) -> Placement:
        s = snap.spec
        order = sorted((j for j, d in enumerate(snap.devices) if d.usable),
                       key=lambda j: (-snap.devices[j].flops, j))
        if not order:
            raise Infeasible("equal_split: no device may host blocks")
        size = {k: cost.block_bytes(s, k, snap.n_end) for k in ("head", "proj", "ffn")}
        free = {j: snap.devices[j].capacity for j in order}
        assign = []
        def deal(kind: str, count: int, layer: int) -> None:
            turn = 0  # every layer's deal starts at the fastest device
            for _ in range(count):
                for k in range(len(order)):
                    j = order[(turn + k) % len(order)]
                    if free[j] >= size[kind]:
                        break
                else:
                    raise Infeasible(f"equal_split: no device has {size[kind]} B free for a {kind} of layer {layer}")
                free[j] -= size[kind]
                assign.append(j)
                turn = order.index(j) + 1

        for layer in range(s.layers):
            deal("head", s.groups, layer)
            j = next((j for j in order if free[j] >= size["proj"]), -1)
            if j < 0:
                raise Infeasible(f"equal_split: no device has {size['proj']} B free for proj.{layer}")
            free[j] -= size["proj"]
            assign.append(j)
            if s.sharded:
                deal("ffn", s.ffn_shards, layer)
            else:
                j = next((j for j in order if free[j] >= size["ffn"]), -1)
                if j < 0:
                    raise Infeasible(f"equal_split: no device has {size['ffn']} B free for ffn.{layer}")
                free[j] -= size["ffn"]
                assign.append(j)
        return Placement(s, tuple(assign))
