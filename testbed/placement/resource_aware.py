"""`resource_aware`: the paper's myopic head-level algorithm, and `static`. Pure.

At every decision epoch, with the snapshot's view of devices and links:
1. blocks are taken in decreasing normalised demand
   `memory / max device memory + FLOPs / max device rate` (ties: model order);
2. a block may go only where it fits: weights + its cache grown to the end of the coming
   interval, within what the device has left after the blocks already taken;
3. among those devices it takes the one with the smallest bottleneck score
   `S(i,j) = max(F_i / C_j, M_i / M_j_available, comm_time_ij)`;
4. on later epochs a placed block moves to that device only if the inference delay it
   saves over the coming interval exceeds its migration delay; it must move when its
   device can no longer hold it.
Complexity O(|B| log |B| + |B| |V|) per epoch.

Our reading of the open points (what the paper leaves open):
- compute is time, not capacity: for a head, F_i / C_j counts the head work of the same
  layer already given to j, since those heads run one after another on j (this is what
  makes heads spread out and run in parallel); proj and ffn use F_i / C_j as written;
- comm_time_ij is the time of the block's input and output transfers given the devices of
  its dataflow neighbours already placed (current positions when re-planning);
- "the inference delay it saves" is the block's own delay, compute + transfer time (the
  time terms of its score), at its device versus the best-scoring one, over the coming
  interval; the migration delay is `problem.migration_cost`: weights + cache over the
  link with stop-and-copy, the expected stall, interference and lag of pre-copy. (The critical path of the whole token is what `resource_aware_ls` optimises.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..model import cost
from .problem import Infeasible, LatencyModel, Placement, Snapshot, migration_cost, migration_delay


def _div(a: float, b: float) -> float:
    """a / b as numpy divides doubles: a zero divisor gives inf, -inf or nan, not an error."""
    if b != 0.0:
        return a / b
    return math.nan if a == 0.0 or a != a else math.copysign(math.inf, a) * math.copysign(1.0, b)


def _max(a: float, b: float) -> float:
    """`np.maximum` of two doubles: nan when either is nan."""
    return a if a >= b else b if b > a else math.nan


def _argmin(xs: list[float]) -> int:
    """`np.argmin`: the first minimum, or the first nan."""
    best = 0
    for j, x in enumerate(xs):
        if x != x:
            return j
        if x < xs[best]:
            best = j
    return best


class _Layout:
    """Tentative positions (-1: not placed) with per-layer neighbourhood queries. Per device
    the figures are Python lists: with a few devices, one block's arithmetic in Python takes
    a fraction of the time of the same arithmetic as numpy calls on arrays of a few elements
    (a decision is host work that must fit its modelled cost on the real clock), and doubles
    give the same bits either way. With tens of devices arrays would be faster (48 devices
    take about 1.6x as long as with arrays); the emulated scenarios have a few."""

    def __init__(self, snap: Snapshot, model: LatencyModel) -> None:
        s = self.spec = snap.spec
        self.per, self.groups, self.layers = s.per_layer, s.groups, s.layers
        self.src = snap.source
        self.V = range(snap.n_devices)
        cur = snap.current.assign if snap.current is not None else None
        self.pos: list[int] = list(cur) if cur is not None else [-1] * len(s.blocks)
        # transfer times j -> k: a hidden state, one group's output, one shard's partial, the last one home
        tables = (model.hidden_t, model.xfer_matrix(model.head_bytes(1)), model.xfer_matrix(model.partial[1]),
                  model.tail_t)
        self.hidden_t, self.out_t, self.partial_t, self.tail_t = (t.tolist() for t in tables)
        # the largest of a few transfer times: the builtin max, unless a table holds nan:
        # then `_maxof`, nan as an array's max would be (the builtin's answer depends on order)
        self.top: Callable[[list[float]], float] = _maxof if any(np.isnan(t).any() for t in tables) else max

    def upstream(self, layer: int) -> int:
        """Device holding x before the layer (-1 unknown): the source, or the previous
        layer's ffn (shard 0)."""
        return self.src if layer == 0 else self.pos[layer * self.per - self.per + self.groups + 1]

    def comm(self, i: int) -> list[float]:
        """comm_time_ij for every device j, from the neighbours already placed."""
        per, G = self.per, self.groups
        layer, r = divmod(i, per)
        base, pos, top = layer * per, self.pos, self.top
        hidden_t = self.hidden_t
        if r < G:  # a head: x in, its output to proj
            u, p = self.upstream(layer), pos[base + G]
            t = [0.0 + x for x in hidden_t[u]] if u >= 0 else [0.0 for _ in self.V]
            if p >= 0:
                t = [a + row[p] for a, row in zip(t, self.out_t, strict=True)]
        elif r == G:  # proj: residual in, head outputs in, hidden out to ffn
            u, f = self.upstream(layer), pos[base + G + 1]
            t = [0.0 + x for x in hidden_t[u]] if u >= 0 else [0.0 for _ in self.V]
            placed = sorted({h for h in pos[base:base + G] if h >= 0})
            if placed:
                t = [a + top([self.out_t[h][j] for h in placed]) for j, a in enumerate(t)]
            if f >= 0:
                t = [a + row[f] for a, row in zip(t, hidden_t, strict=True)]
        else:  # ffn: hidden in from proj, out to the next layer's heads and proj (or source)
            p = pos[base + G]
            t = [0.0 + x for x in hidden_t[p]] if p >= 0 else [0.0 for _ in self.V]
            if r > G + 1:  # an ffn shard but 0: its partial output to shard 0's device
                f = pos[base + G + 1]
                if f >= 0:
                    t = [a + row[f] for a, row in zip(t, self.partial_t, strict=True)]
            elif layer + 1 < self.layers:
                placed = sorted({h for h in pos[base + per:base + per + G + 1] if h >= 0})  # its heads and proj
                if placed:
                    t = [a + top([row[h] for h in placed]) for a, row in zip(t, hidden_t, strict=True)]
            else:
                t = [a + row[self.src] for a, row in zip(t, self.tail_t, strict=True)]
        return t


def _maxof(xs: list[float]) -> float:
    """The largest of xs, nan when any is (numpy's max)."""
    out = -math.inf
    for x in xs:
        out = _max(out, x)
    return out


def plan(snap: Snapshot) -> Placement:
    """One decision epoch of the paper's algorithm (initial placement when
    `snap.current` is None)."""
    s = snap.spec
    model = LatencyModel(snap)
    lay = _Layout(snap, model)
    V = lay.V
    usable = [d.usable for d in snap.devices]
    if not any(usable):
        raise Infeasible("no device may host blocks")
    capacity = [float(d.capacity) for d in snap.devices]
    rate: list[float] = model.flops.tolist()
    bandwidth: list[float] = model.bandwidth.tolist()
    kinds = [b.kind for b in s.blocks]
    mem_of = {k: float(cost.block_bytes(s, k, snap.n_end)) for k in ("head", "proj", "ffn")}
    flops_of = {"head": model.head_flops(snap.n_mid), "proj": model.proj_flops, "ffn": model.ffn_flops}
    mem = np.array([mem_of[k] for k in kinds])
    flops = np.array([flops_of[k] for k in kinds])
    bytes_of = {"head": model.head_bytes_moved(snap.n_mid), "proj": model.proj_bytes, "ffn": model.ffn_bytes}
    moved = [float(bytes_of[k]) for k in kinds]
    cap_max = max(c for c, u in zip(capacity, usable, strict=True) if u)
    rate_max = max(r for r, u in zip(rate, usable, strict=True) if u)
    demand = mem / cap_max + flops / rate_max
    order = np.argsort(-demand, kind="stable").tolist()

    def times(flops: list[float], nbytes: list[float]) -> list[float]:  # `LatencyModel.times`, per device
        if not model.bound:
            return [_div(f, r) for f, r in zip(flops, rate, strict=True)]
        return [_max(_div(f, r), _div(b, w)) for f, b, r, w in zip(flops, nbytes, rate, bandwidth, strict=True)]

    current = snap.current.assign if snap.current is not None else None
    # pre-copy's cost counts the tokens that run on the placement in force meanwhile
    token_s = model.token_time(snap.current, snap.n_mid) if snap.current is not None and \
        snap.migration == "pre_copy" else math.inf
    chosen: list = []  # pre-copy: the moves taken so far (they cross and switch together)
    chosen_saved = 0.0  # what they save per token once switched
    if current is not None:
        # a block on a device that is gone or may no longer host blocks has no position
        for i, j in enumerate(current):
            if not usable[j]:
                lay.pos[i] = -1
    used = [0.0 for _ in V]
    layer_load = [[0.0 for _ in V] for _ in range(s.layers)]
    layer_moved = [[0.0 for _ in V] for _ in range(s.layers)]  # bytes of a layer's heads on a device (one job)
    shard_load = [[0.0 for _ in V] for _ in range(s.layers)]  # likewise for the ffn shards of a layer
    shard_moved = [[0.0 for _ in V] for _ in range(s.layers)]
    alone = [0.0 for _ in V]  # a proj or an unsharded ffn runs as a job of its own
    for i in order:
        layer, r = divmod(i, s.per_layer)
        is_head = r < s.groups
        is_shard = s.sharded and r > s.groups
        mem_i, flops_i, moved_i = float(mem[i]), float(flops[i]), moved[i]
        avail = [c - u for c, u in zip(capacity, used, strict=True)]
        feasible = [ok and a >= mem_i for ok, a in zip(usable, avail, strict=True)]
        if not any(feasible):
            largest = max(a for a, ok in zip(avail, usable, strict=True) if ok)
            raise Infeasible(f"{s.blocks[i].name} ({int(mem_i)} B) fits on no device "
                             f"(largest free: {int(largest)} B)")
        # the shards of a layer on one device run as one job, as its heads do
        load, load_moved = ((shard_load[layer], shard_moved[layer]) if is_shard else
                            (layer_load[layer], layer_moved[layer]) if is_head else (alone, alone))
        compute = times([f + flops_i for f in load], [b + moved_i for b in load_moved])
        comm = lay.comm(i)
        memratio = [mem_i / a if a > 0 else math.inf for a in avail]
        score = [_max(_max(c, m), t) if ok else math.inf
                 for c, m, t, ok in zip(compute, memratio, comm, feasible, strict=True)]
        j = _argmin(score)
        if not feasible[j]:  # every feasible device scores inf (links down): least memory ratio
            j = _argmin([m if ok else math.inf for m, ok in zip(memratio, feasible, strict=True)])
        c = lay.pos[i] if current is not None else -1
        if c >= 0 and j != c and feasible[c]:
            # stay unless the block's own delay (compute + transfers) saved over the
            # interval pays for moving it
            saved = snap.interval * ((compute[c] + comm[c]) - (compute[j] + comm[j]))
            move = (s.blocks[i], c, j)
            if snap.migration != "pre_copy":
                if saved <= migration_delay(snap, [move]):
                    j = c
            else:  # what this move adds to the batch's cost (it delays every switch)
                per_token = (compute[c] + comm[c]) - (compute[j] + comm[j])
                extra = migration_cost(snap, [*chosen, move], chosen_saved + per_token, token_s) - \
                    migration_cost(snap, chosen, chosen_saved, token_s)
                if saved <= extra:
                    j = c
                else:
                    chosen.append(move)
                    chosen_saved += per_token
        lay.pos[i] = j
        used[j] += mem_i
        if is_head:
            layer_load[layer][j] += flops_i
            layer_moved[layer][j] += moved_i
        elif is_shard:
            shard_load[layer][j] += flops_i
            shard_moved[layer][j] += moved_i
    return Placement(s, tuple(lay.pos))


class ResourceAware:
    name = "resource_aware"
    dynamic = True

    def place(self, snap: Snapshot) -> Placement:
        return plan(snap)


class Static:
    """The resource-aware initial placement, never re-planned: the reference for what
    re-partitioning buys."""

    name = "static"
    dynamic = False

    def place(self, snap: Snapshot) -> Placement:
        return plan(snap.with_(current=None))
