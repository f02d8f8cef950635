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

import numpy as np

from ..model import cost
from .problem import Infeasible, LatencyModel, Placement, Snapshot, migration_cost, migration_delay


class _Layout:
    """Tentative positions (-1: not placed) with per-layer neighbourhood queries."""

    def __init__(self, snap: Snapshot, model: LatencyModel) -> None:
        s = self.spec = snap.spec
        self.per = s.per_layer
        self.model = model
        self.src = snap.source
        V = snap.n_devices
        cur = snap.current.assign if snap.current is not None else None
        self.pos = np.array(cur if cur is not None else [-1] * len(s.blocks), dtype=np.int64)
        self.out_t = model.xfer_matrix(model.head_bytes(1))  # one group's output j -> k
        self.partial_t = model.xfer_matrix(model.partial[1])  # one ffn shard's partial output j -> k
        self.zero = np.zeros(V)

    def idx(self, kind: str, layer: int, g: int = 0) -> int:
        return self.spec.position(kind, layer, g)

    def upstream(self, layer: int) -> int:
        """Device holding x before the layer (-1 unknown)."""
        return self.src if layer == 0 else int(self.pos[self.idx("ffn", layer - 1)])

    def comm(self, i: int) -> np.ndarray:
        """comm_time_ij for every device j, from the neighbours already placed."""
        s, m = self.spec, self.model
        layer, r = divmod(i, self.per)
        t = self.zero.copy()
        if r < s.groups:  # a head: x in, its output to proj
            u, p = self.upstream(layer), self.pos[self.idx("proj", layer)]
            if u >= 0:
                t += m.hidden_t[u, :]
            if p >= 0:
                t += self.out_t[:, p]
        elif r == s.groups:  # proj: residual in, head outputs in, hidden out to ffn
            u, f = self.upstream(layer), self.pos[self.idx("ffn", layer)]
            if u >= 0:
                t += m.hidden_t[u, :]
            hr = s.head_range(layer)
            heads = self.pos[hr.start:hr.stop]
            placed = np.unique(heads[heads >= 0])
            if placed.size:
                t += self.out_t[placed, :].max(axis=0)
            if f >= 0:
                t += m.hidden_t[:, f]
        else:  # ffn: hidden in from proj, out to the next layer's heads and proj (or source)
            p = self.pos[self.idx("proj", layer)]
            if p >= 0:
                t += m.hidden_t[p, :]
            if r > s.groups + 1:  # an ffn shard but 0: its partial output to shard 0's device
                f = self.pos[self.idx("ffn", layer)]
                if f >= 0:
                    t += self.partial_t[:, f]
            elif layer + 1 < s.layers:
                hr = s.head_range(layer + 1)
                nxt = self.pos[hr.start:hr.stop + 1]  # its heads and proj
                placed = np.unique(nxt[nxt >= 0])
                if placed.size:
                    t += m.hidden_t[:, placed].max(axis=1)
            else:
                t += m.tail_t[:, self.src]
        return t


def plan(snap: Snapshot) -> Placement:
    """One decision epoch of the paper's algorithm (initial placement when
    `snap.current` is None)."""
    s = snap.spec
    model = LatencyModel(snap)
    lay = _Layout(snap, model)
    V = snap.n_devices
    usable = np.array([d.usable for d in snap.devices])
    if not usable.any():
        raise Infeasible("no device may host blocks")
    capacity = np.array([d.capacity for d in snap.devices], dtype=float)
    rate = model.flops
    kinds = [b.kind for b in s.blocks]
    mem_of = {k: float(cost.block_bytes(s, k, snap.n_end)) for k in ("head", "proj", "ffn")}
    flops_of = {"head": model.head_flops(snap.n_mid), "proj": model.proj_flops, "ffn": model.ffn_flops}
    mem = np.array([mem_of[k] for k in kinds])
    flops = np.array([flops_of[k] for k in kinds])
    bytes_of = {"head": model.head_bytes_moved(snap.n_mid), "proj": model.proj_bytes, "ffn": model.ffn_bytes}
    moved = np.array([bytes_of[k] for k in kinds])
    demand = mem / capacity[usable].max() + flops / rate[usable].max()
    order = np.argsort(-demand, kind="stable")

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
    used = np.zeros(V)
    layer_load = np.zeros((s.layers, V))
    layer_moved = np.zeros((s.layers, V))  # bytes of the heads of a layer on a device (one job)
    shard_load = np.zeros((s.layers, V))  # likewise for the ffn shards of a layer (sharded models)
    shard_moved = np.zeros((s.layers, V))
    for i in order:
        i = int(i)
        layer, r = divmod(i, s.per_layer)
        is_head = r < s.groups
        is_shard = s.sharded and r > s.groups
        avail = capacity - used
        feasible = usable & (avail >= mem[i])
        if not feasible.any():
            raise Infeasible(f"{s.blocks[i].name} ({int(mem[i])} B) fits on no device "
                             f"(largest free: {int(avail[usable].max())} B)")
        if is_shard:  # the shards of a layer on one device run as one job, as its heads do
            compute = model.times(shard_load[layer] + flops[i], shard_moved[layer] + moved[i])
        else:
            compute = model.times((layer_load[layer] if is_head else 0.0) + flops[i],
                                  (layer_moved[layer] if is_head else 0.0) + moved[i])
        comm = lay.comm(i)
        with np.errstate(divide="ignore"):
            memratio = np.where(avail > 0, mem[i] / avail, math.inf)
        score = np.maximum(np.maximum(compute, memratio), comm)
        score[~feasible] = math.inf
        j = int(np.argmin(score))
        if not feasible[j]:  # every feasible device scores inf (links down): least memory ratio
            j = int(np.argmin(np.where(feasible, memratio, math.inf)))
        c = int(lay.pos[i]) if current is not None else -1
        if c >= 0 and j != c and feasible[c]:
            # stay unless the block's own delay (compute + transfers) saved over the
            # interval pays for moving it
            delay = compute + comm
            saved = snap.interval * (delay[c] - delay[j])
            move = (s.blocks[i], c, j)
            if snap.migration != "pre_copy":
                if saved <= migration_delay(snap, [move]):
                    j = c
            else:  # what this move adds to the batch's cost (it delays every switch)
                per_token = float(delay[c] - delay[j])
                extra = migration_cost(snap, [*chosen, move], chosen_saved + per_token, token_s) - \
                    migration_cost(snap, chosen, chosen_saved, token_s)
                if saved <= extra:
                    j = c
                else:
                    chosen.append(move)
                    chosen_saved += per_token
        lay.pos[i] = j
        used[j] += mem[i]
        if is_head:
            layer_load[layer, j] += flops[i]
            layer_moved[layer, j] += moved[i]
        elif is_shard:
            shard_load[layer, j] += flops[i]
            shard_moved[layer, j] += moved[i]
    return Placement(s, tuple(int(x) for x in lay.pos))


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
