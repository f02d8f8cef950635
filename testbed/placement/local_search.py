"""`resource_aware_ls`: the paper's algorithm followed by a local search on the full epoch
objective `interval x per-token latency + migration delay` (our improvement). Pure.

Neighbourhood, tried in this order until no step improves (or the evaluation budget is spent):
- move one block to another device;
- move every head of a layer that sits on one device to another device (a group move,
  which single moves cannot find when one head alone gains nothing);
- move a whole layer to one device;
- swap two blocks of one layer that sit on different devices (frees a full device).
It starts from several placements (see `ResourceAwareLS`) and keeps the best.
Every step keeps memory feasible (caches grown to the end of the interval). The per-token
latency is separable by layer, so a step re-evaluates only the layers it touches.

The search is bounded by a count of evaluations (candidate steps priced), never by the
clock: the same snapshot gives the same plan on any machine, loaded or not.
"""

from __future__ import annotations

import math
from collections.abc import Collection

from ..model import cost
from .layer_based import LayerDP
from .problem import (
    Infeasible,
    LatencyModel,
    Placement,
    Snapshot,
    epoch_objective,
    memory_need,
    violations,
)
from .resource_aware import plan
from .tensor_parallel import tensor_parallel

EPS = 1e-12
# candidate steps priced per decision, over all starts (see ResourceAwareLS): a count, not a
# time, so a plan never depends on the host's speed; large enough that more steps found no
# better plan on the sweep's optimality instances and the shipped scenarios
MAX_EVALS = 20000


class _State:
    def __init__(self, snap: Snapshot, start: Placement, layouts: dict[tuple[int, ...], float] | None = None) -> None:
        """The search's state from `start`; `layouts`: the layer times already priced on this
        snapshot (by other starts of one decision), shared."""
        s = self.spec = snap.spec
        self.snap = snap
        self.model = LatencyModel(snap)
        self.per = s.per_layer
        self.a = list(start.assign)
        self.cur = list(snap.current.assign) if snap.current is not None else None
        self.usable = [d.usable for d in snap.devices]
        # per device and per block as lists of floats, not arrays: `delta` runs thousands of
        # times per decision on a few entries each, where numpy's per-element cost dominates
        self.cap = [float(d.capacity) + 0.5 for d in snap.devices]  # over this a device is full
        kinds = [b.kind for b in s.blocks]
        self.kind = kinds
        self.mem = [float(cost.block_bytes(s, k, snap.n_end)) for k in kinds]
        self.mig_bytes = [float(cost.block_bytes(s, k, snap.seq_len) + cost.FRAME_OVERHEAD) for k in kinds]
        self.used = [0.0] * snap.n_devices
        for i, j in enumerate(self.a):
            self.used[j] += self.mem[i]
        self.over = {j for j, u in enumerate(self.used) if u > self.cap[j]}  # devices over capacity
        self.n = snap.n_mid
        # per layer: its head indices [h0, h1) (proj at h1, ffn shard 0 at h1 + 1), the index
        # of the block whose device feeds it (the previous ffn; -1: the source), its ffn
        # shards' indices when the FFN is sharded (else none)
        self._at = [(s.head_range(l).start, s.head_range(l).stop, self._ffn(l - 1) if l else -1,
                     tuple(s.shard_range(l)) if s.sharded else ()) for l in range(s.layers)]
        self._ffn_role = s.groups + 1  # a block's index within its layer that makes it ffn (shard 0)
        self._shards = s.ffn_shards  # the ffn blocks after each layer's proj (1 when not sharded)
        self._layouts: dict[tuple[int, ...], float] = {} if layouts is None else layouts
        self.evals = 0  # candidate steps priced so far (the search's budget counts these)
        self.layer_t = [self._layer(l) for l in range(s.layers)]
        self.tail = self.model.tail_time(self.a[self._ffn(s.layers - 1)])
        self.links: dict[tuple[int, int], float] = {}
        if self.cur is not None:
            for i, (c, j) in enumerate(zip(self.cur, self.a, strict=True)):
                if c != j:
                    self.links[(c, j)] = self.links.get((c, j), 0.0) + self.mig_bytes[i]
        self.mig = self._mig(self.links)  # the migration delay of the placement as it stands
        self._index_links()

    def _ffn(self, l: int) -> int:
        return self.spec.position("ffn", l)

    def _layer(self, l: int) -> float:
        """Layer l's time under the assignment `self.a` (remembered per layer and the devices
        of its blocks and of its input: the search prices the same layouts again and again)."""
        a = self.a
        h0, h1, prev, shard_idx = self._at[l]
        key = (l, a[prev] if prev >= 0 else -1, *a[h0:h1 + 1 + self._shards])
        t = self._layouts.get(key)
        if t is None:
            t = self._layouts[key] = self._layer_time(l)
        return t

    def _layer_time(self, l: int) -> float:
        a = self.a
        h0, h1, prev, shard_idx = self._at[l]
        heads: dict[int, int] = {}
        for j in a[h0:h1]:
            heads[j] = heads.get(j, 0) + 1
        u = self.snap.source if prev < 0 else a[prev]
        shards: dict[int, int] = {}
        for i in shard_idx:
            j = a[i]
            shards[j] = shards.get(j, 0) + 1
        return self.model.layer_time(u, heads, a[h1], a[h1 + 1], self.n, shards)  # proj, ffn

    def _mig(self, links: dict[tuple[int, int], float]) -> float:
        xfer = self.model.xfer  # the links carry no loops: c != j
        return max((xfer(a, c, v) for (a, c), v in links.items() if v > 0), default=0.0)

    def _index_links(self) -> None:
        """Each carrying link's transfer time under the current assignment, slowest first
        (for `_mig_after`), and whether any is nan (whose max depends on the order)."""
        times = [(self.model.xfer(a, c, v), (a, c)) for (a, c), v in self.links.items() if v > 0]
        self._nan = any(math.isnan(t) for t, _ in times)
        self._slowest = sorted(times, key=lambda tk: -tk[0]) if not self._nan else []

    def _mig_after(self, touched: dict[tuple[int, int], float]) -> float:
        """`_mig` of the links with `touched`'s bytes in place of theirs: the slowest link the
        step leaves alone (the first of `_slowest` not touched) against the touched ones."""
        if self._nan:  # with a nan, `_mig`'s own order decides
            return self._mig({**self.links, **touched})
        xfer = self.model.xfer
        out = 0.0
        first = True
        for (a, c), v in touched.items():
            if v > 0:
                t = xfer(a, c, v)
                if t != t:
                    return self._mig({**self.links, **touched})
                if first or t > out:
                    out, first = t, False
        for t, k in self._slowest:
            if k not in touched:
                return max(out, t)
        return out

    def objective(self) -> float:
        return self.snap.interval * (sum(self.layer_t) + self.tail) + self.mig

    def _affected(self, blocks: Collection[int]) -> list[int]:
        if len(blocks) == 1:  # most steps: one block, its layer (and the next, for an ffn)
            (i,) = blocks
            l, r = divmod(i, self.per)
            return [l, l + 1] if r == self._ffn_role else [l]
        out: set[int] = set()
        for i in blocks:
            l, r = divmod(i, self.per)
            out.add(l)
            if r == self._ffn_role:  # an ffn (shard 0) feeds the next layer (or the tail)
                out.add(l + 1)
        return sorted(out)

    def delta(self, changes: dict[int, int]) -> float | None:
        """Objective change if blocks move as `changes` says; None if infeasible."""
        self.evals += 1
        used: dict[int, float] = {}  # the devices the step touches, with their memory after it
        for i, j in changes.items():
            if not self.usable[j]:
                return None
            o = self.a[i]
            used[o] = used.get(o, self.used[o]) - self.mem[i]
            used[j] = used.get(j, self.used[j]) + self.mem[i]
        cap = self.cap
        for j, u in used.items():
            if u > cap[j]:
                return None
        if self.over and not self.over <= used.keys():  # a device over capacity the step leaves alone
            return None
        a = self.a  # the step applied in place while it is priced, then undone
        was = {i: a[i] for i in changes}
        d_time = 0.0
        L = self.spec.layers
        try:
            for i, j in changes.items():
                a[i] = j
            for l in self._affected(changes):
                new, old = (self._layer(l), self.layer_t[l]) if l < L else (
                    self.model.tail_time(a[self._ffn(L - 1)]), self.tail)
                d_time += 0.0 if new == old else new - old
        finally:
            for i, c in was.items():
                a[i] = c
        d_mig = 0.0
        if self.cur is not None:
            touched: dict[tuple[int, int], float] = {}  # the links whose bytes the step changes
            for i, j in changes.items():
                c, o = self.cur[i], self.a[i]
                if c != o:
                    touched[(c, o)] = touched.get((c, o), self.links[(c, o)]) - self.mig_bytes[i]
                if c != j:
                    touched[(c, j)] = touched.get((c, j), self.links.get((c, j), 0.0)) + self.mig_bytes[i]
            after = self._mig_after(touched)
            d_mig = 0.0 if after == self.mig else after - self.mig
        d = self.snap.interval * d_time + d_mig
        return None if math.isnan(d) else d

    def apply(self, changes: dict[int, int]) -> None:
        for i, j in changes.items():
            old = self.a[i]
            self.used[old] -= self.mem[i]
            self.used[j] += self.mem[i]
            for d in (old, j):
                if self.used[d] > self.cap[d]:
                    self.over.add(d)
                else:
                    self.over.discard(d)
            if self.cur is not None:
                c = self.cur[i]
                if c != old:
                    self.links[(c, old)] -= self.mig_bytes[i]
                if c != j:
                    self.links[(c, j)] = self.links.get((c, j), 0.0) + self.mig_bytes[i]
            self.a[i] = j
        self.mig = self._mig(self.links)
        self._index_links()
        L = self.spec.layers
        for l in self._affected(changes):
            if l < L:
                self.layer_t[l] = self._layer(l)
            else:
                self.tail = self.model.tail_time(self.a[self._ffn(L - 1)])


def _move_best(st: _State, blocks: list[int], devices: list[int]) -> bool:
    """Move `blocks` together to the device that improves the objective most, if any."""
    best, arg = -EPS, None
    for j in devices:
        if any(st.a[i] != j for i in blocks):
            d = st.delta(dict.fromkeys(blocks, j))
            if d is not None and d < best:
                best, arg = d, j
    if arg is None:
        return False
    st.apply(dict.fromkeys(blocks, arg))
    return True


def improve(snap: Snapshot, start: Placement, max_evals: int = MAX_EVALS, max_rounds: int = 50) -> Placement:
    """Hill-climb from `start` on the epoch objective; never returns a worse placement.
    Stops when no step improves, after `max_rounds` rounds, or once `max_evals` candidate
    steps have been priced (checked after each single move and after each layer's group
    and layer moves or swaps, so it may go over by that much)."""
    return _climb(_State(snap, start), max_evals, max_rounds)


def _climb(st: _State, max_evals: int, max_rounds: int) -> Placement:
    s = st.spec
    devices = [j for j in range(st.snap.n_devices) if st.usable[j]]

    def done() -> Placement | None:
        return Placement(s, tuple(st.a)) if st.evals >= max_evals else None

    for _ in range(max_rounds):
        improved = False
        # single moves: best device for each block
        for i in range(len(st.a)):
            improved |= _move_best(st, [i], devices)
            if (p := done()) is not None:
                return p
        for l in range(s.layers):
            # group moves: all heads of a layer on one device to another device
            heads = s.head_range(l)
            for a in sorted({st.a[i] for i in heads}):
                improved |= _move_best(st, [i for i in heads if st.a[i] == a], devices)
            if s.sharded:  # likewise the ffn shards of a layer on one device
                shards = s.shard_range(l)
                for a in sorted({st.a[i] for i in shards}):
                    improved |= _move_best(st, [i for i in shards if st.a[i] == a], devices)
            # layer moves: every block of a layer to one device (consolidation, pipelines)
            improved |= _move_best(st, list(s.layer_range(l)), devices)
            if (p := done()) is not None:
                return p
        # swaps within a layer
        for l in range(s.layers):
            idx = s.layer_range(l)
            for i in idx:
                for k in idx:
                    if k <= i or st.a[i] == st.a[k]:
                        continue
                    d = st.delta({i: st.a[k], k: st.a[i]})
                    if d is not None and d < -EPS:
                        st.apply({i: st.a[k], k: st.a[i]})
                        improved = True
            if (p := done()) is not None:
                return p
        if not improved:
            break
    return Placement(s, tuple(st.a))


class ResourceAwareLS:
    """Local search from several starts, the best on the epoch objective wins: the paper's
    plan (so never worse than `resource_aware`), the current placement (so never worse
    than staying), the layer-based DP plan, and everything on each of the fastest devices
    that can hold it all (consolidation, which single moves cannot reach).

    `max_evals` bounds the whole decision: the starts take turns in that order, each with an
    equal share of what is left, so a start that converges early leaves its unused
    evaluations to the next ones."""

    name = "resource_aware_ls"
    dynamic = True
    CONSOLIDATE = 3  # all-on-one starts on the fastest devices that fit

    def __init__(self, max_evals: int = MAX_EVALS) -> None:
        self.max_evals = max_evals

    def starts(self, snap: Snapshot) -> list[Placement]:
        out = [plan(snap)]
        if snap.current is not None and not violations(snap, snap.current):
            out.append(snap.current)
        try:
            out.append(LayerDP().place(snap))
        except Infeasible:
            pass
        need = memory_need(snap, Placement(snap.spec, (0,) * len(snap.spec.blocks))).sum()
        fast = sorted((j for j, d in enumerate(snap.devices) if d.usable and d.capacity >= need),
                      key=lambda j: (-snap.devices[j].flops, j))
        out += [Placement(snap.spec, (j,) * len(snap.spec.blocks)) for j in fast[: self.CONSOLIDATE]]
        if snap.spec.sharded and (tp := tensor_parallel(snap)) is not None:
            out.append(tp)  # fine-grained plans single moves from a pipeline do not reach
        return out

    def place(self, snap: Snapshot) -> Placement:
        starts = self.starts(snap)
        best, best_obj = None, math.inf
        left = self.max_evals
        layouts: dict[tuple[int, ...], float] = {}
        for k, start in enumerate(starts):
            st = _State(snap, start, layouts)
            p = _climb(st, max(0, left) // (len(starts) - k), max_rounds=50)
            left -= st.evals
            obj = epoch_objective(snap, p)
            if best is None or obj < best_obj:
                best, best_obj = p, obj
        assert best is not None
        return best
