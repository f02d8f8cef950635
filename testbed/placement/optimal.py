"""`optimal`: the exact minimum of `epoch_objective` as a mixed-integer linear program,
solved by HiGHS through `scipy.optimize.milp`. Pure: numpy and scipy, no IO.

Variables per layer l and device j (G head blocks (K/V groups) per layer, times in units
of a reference token time so the objective is of order 1):
- h[l,j] integer in [0, G]: head blocks of l on j (heads of a layer are interchangeable in
  the latency and memory model, so counts suffice); y[l,j] binary, h <= G y, y <= h;
- p[l,j], f[l,j] binary, one-hot: proj and ffn of l; x enters layer l from w = f[l-1]
  (the source for l = 0);
- the chain w -> p[l] -> f[l] as product variables e[l,a,b] = w_a p_b and
  z[l,b,c] = p_b f_c with both marginals (sum_b e[a,b] = w_a, sum_a e[a,b] = p_b): exact
  for one-hot vectors and a tight LP relaxation (it is a path);
- R_l >= arrival of proj's last input: the residual sum_ab hidden_t[a,b] e[l,a,b]; and per
  head device j: sum_a hidden_t[a,j] w_a + h hf / C_j + frame(j -> b, h groups)
  - M_y (1 - y_j) - M_p (1 - p_b) for every b != j (without the frame, and without the
  p term, for b = j). frame(k) = max(0, head_base + k per_group - burst) / rate + latency
  (the head-output frame of `LatencyModel`) is a max of two lines in k: both are rows
  when the burst exceeds head_base, else the sloped one alone. Big-Ms are per row from the
  instance: M_y = the largest x arrival at j (+ an empty frame), since y = 0 forces h = 0;
  M_p = that + G hf / C_j + frame(G);
- the head outputs of j = w queue behind the residual on the link j -> b = proj: R_l >=
  (hidden + head_base + h per_group - burst) / rate + latency - M (1 - y_j) - M (1 - p_b)
  - M (1 - w_j) for every b != j (w_j is f[l-1,j], or the constant [j = source] for
  l = 0), M = that line at h = G (its flat part, the latency, is already a bound above);
- layer time T_l = R_l + proj / C_b p_b + sum hidden_t[b,c] z[l,b,c] + ffn / C_c f_c,
  tail sum_c tail_t[c,src] f[L-1,c] + LM head (a constant);
- memory: every usable device's blocks (caches at n_end) within its capacity;
- migration (when `snap.current` is set): integer flows m[l,a,c] of head blocks out of
  their current device a (at most what a holds: a block moves once, never relayed), with
  h[l,c] = cur[l,c] + in - out; proj/ffn of l move iff p/f leave their current device. Per
  link with possible traffic, t[a,c] binary (each moved block's variable <= its bound x t),
  D >= (bytes - burst) / rate + latency t, and D >= latency t when the link has burst.
  Valid cuts (redundant for integers, they only tighten the LP): D >= each block's own
  transfer time wherever it goes.
- ffn shards (model.ffn_shards N > 1): f[l,j] is shard 0's device; sc[l,j] integer in
  [0, N-1] the other shards on j (interchangeable, flows like heads when migrating), ys a
  binary for "any shard on j"; the term p -> f of T_l becomes Q_l >= sum_b hidden_t[b,j] p_b
  + (sc_j + f_j) shard time on j (+ the partial-sum frame j -> c, a max of two lines in the
  count, when c = f is another device), with big-Ms as for the heads (`_shards`).
Objective: interval (sum_l T_l + tail) + D. Every max and product is exact at the optimum
(minimised), so the MILP optimum is the minimum of `epoch_objective`; `place` converts the
counts back (heads keep their device up to the new count, the rest follow the flows,
lowest group index first, cycles in the flows cancelled), checks memory and records the
MILP value next to `epoch_objective` of the answer (`Optimal.last`).

Links that are down (rate <= 0) are forbidden, not priced: no variable or product for a
pair that would need one (x into a layer's head or proj devices, head outputs to proj,
proj to ffn, the tail to the source, a migration). When every memory-feasible placement
needs one (each has infinite latency), `place` raises Infeasible.

HiGHS runs with presolve off by default: the HiGHS 1.12 bundled with scipy 1.17 returned a
sub-optimal point as optimal on one of our instances with presolve on (kept as a regression
test); with presolve off solve times are about the same. Its MIP feasibility tolerance is
1e-9 (`MIP_FEASIBILITY_TOL`) instead of 1e-6: with the default it returned points that
violate a row by up to 1e-6, i.e. a MILP value below the objective of its own answer.

Size limit (TooLarge beyond it): layers x devices^2 <= 64 and layers <= 4. Measured on this
machine (2 cores), 8 random instances each: FLOP/s 1e10..1e11, links 0.1..1 Gbit/s and
0.5..5 ms, each device's memory 0.4..1.1 of the model (memory binds often), seq_len 64,
interval 4; initial placement / re-plan from the previous optimum after a device slowed
4x and links changed / from a random current placement; mean (max) seconds:
  paper-small..paper-xl (1 layer, 8..64 groups), 3-5 devices: all <= 0.05 (0.13)
  gpt-mini (4 layers, 8 groups), 3 devices: 0.18 (0.45) / 0.30 (0.97) / 0.65 (1.27)
  gpt-mini, 4 devices:                     0.43 (0.64) / 0.47 (1.38) / 1.34 (2.39)
  gpt-tiny (2 layers, 4 groups), 5 devices: 0.11 (0.20) / 0.25 (0.46) / 0.28 (0.63)
Beyond the limit times grow fast with layers: 7 layers x 3 devices up to 4.3 s, 16 x 2
up to 2.3 s (random current placements).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, OptimizeResult, milp
from scipy.sparse import csr_array

from ..model import cost
from .layer_based import link_times
from .problem import (
    Infeasible,
    LatencyModel,
    Placement,
    Snapshot,
    epoch_objective,
    layer_views,
    violations,
    xfer_time,
)

MAX_SIZE = 64  # layers x devices^2
MAX_LAYERS = 4
# HiGHS accepts a MIP solution whose rows are violated by up to its default 1e-6; in units of
# tau a fast link's transfer time is of that order, so the solver could drop it from R_l.
MIP_FEASIBILITY_TOL = 1e-9


class TooLarge(ValueError):
    """The instance is beyond what the exact solver takes on."""


class NotOptimal(RuntimeError):
    """HiGHS stopped (time limit, numerical trouble) without proving optimality."""


@dataclass(frozen=True)
class Solve:
    """What the last `place` did: the MILP's value, `epoch_objective` of the answer, size.
    (No solve time: placement code reads no clock; callers time `place` if they need to.)"""

    milp_objective: float
    objective: float
    variables: int
    constraints: int


class _Program:
    """Variables (bounds, integrality, cost) and sparse rows lo <= a.x <= hi."""

    def __init__(self) -> None:
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.integer: list[int] = []
        self.c: list[float] = []
        self.rows: list[tuple[list[int], list[float]]] = []
        self.lo: list[float] = []
        self.hi: list[float] = []

    def var(self, lb: float, ub: float, integer: bool = False, cost: float = 0.0) -> int:
        self.lb.append(lb)
        self.ub.append(ub)
        self.integer.append(1 if integer else 0)
        self.c.append(cost)
        return len(self.c) - 1

    def row(self, terms: list[tuple[int, float]], lo: float = -math.inf, hi: float = math.inf) -> None:
        self.rows.append(([i for i, _ in terms], [v for _, v in terms]))
        self.lo.append(lo)
        self.hi.append(hi)

    def solve(self, options: dict) -> OptimizeResult:
        data, indices, indptr = [], [], [0]
        for cols, vals in self.rows:
            indices.extend(cols)
            data.extend(vals)
            indptr.append(len(indices))
        A = csr_array((np.array(data, dtype=float), np.array(indices, dtype=np.int64), np.array(indptr)),
                      shape=(len(self.rows), len(self.c)))
        with warnings.catch_warnings():
            # scipy forwards options it does not list (mip_abs_gap) to HiGHS, with a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            return milp(np.array(self.c), integrality=np.array(self.integer),
                        bounds=Bounds(np.array(self.lb), np.array(self.ub)),
                        constraints=LinearConstraint(A, np.array(self.lo), np.array(self.hi)),
                        options=options)


class _Formulation:
    """The MILP of one snapshot; times in units of `tau` so the objective is of order 1."""

    def __init__(self, snap: Snapshot) -> None:
        s = self.spec = snap.spec
        self.snap = snap
        L, G, V = s.layers, s.groups, snap.n_devices
        model = LatencyModel(snap)
        src, I = snap.source, snap.interval
        usable = [d.usable for d in snap.devices]
        if not any(usable):
            raise Infeasible("optimal: no device may host blocks")
        U = self.U = [j for j in range(V) if usable[j]]
        C = model.flops
        rate, lat, burst = snap.rate, snap.latency, snap.burst
        down = self.down = rate <= 0
        np.fill_diagonal(down, False)
        hf, pf, ff = model.head_flops(snap.n_mid), model.proj_flops, model.ffn_flops
        self.lm = model.lm_time
        N = s.ffn_shards
        tau = self.tau = I * (L * (G * hf + pf + N * ff) / max(C[j] for j in U) + self.lm)
        H = self.H = np.where(down, 0.0, link_times(model)) / tau  # only links that are up are used
        Ht = np.where(down, 0.0, link_times(model, model.tail_t)) / tau  # the last hidden state home
        # [V] each: a job's time on every device (the roofline where a device has a bandwidth)
        head_t = model.times(hf, model.head_bytes_moved(snap.n_mid)) / tau
        proj_t, ffn_t = model.times(pf, model.proj_bytes) / tau, model.times(ff, model.ffn_bytes) / tau
        opg, FO = model.head_per_group, model.head_base  # head-output frame: FO + k opg bytes
        views = layer_views(snap.current) if snap.current is not None else None

        P = self.P = _Program()
        shape = (L, V)
        h, y, p, f = (np.full(shape, -1) for _ in range(4))  # -1: no variable (unusable device)
        R = [P.var(0.0, math.inf, cost=I) for _ in range(L)]
        for l in range(L):
            for j in U:
                h[l, j] = P.var(0, G, integer=True)
                y[l, j] = P.var(0, 1, integer=True)
                # proj and ffn may go to j unless that needs a down link: x from the source
                # into layer 0, a migration from the current device, the tail to the source
                ok_p = not (l == 0 and down[src, j])
                ok_f = not (l == L - 1 and down[j, src])
                if views is not None:
                    ok_p &= not down[views[l].proj, j]
                    ok_f &= not down[views[l].ffn, j]
                tail = Ht[j, src] if l == L - 1 else 0.0
                p[l, j] = P.var(0, int(ok_p), integer=True, cost=I * proj_t[j])
                # sharded: f is shard 0 (its compute is priced in Q_l with the other shards)
                f[l, j] = P.var(0, int(ok_f), integer=True, cost=I * ((ffn_t[j] if N == 1 else 0.0) + tail))
                P.row([(h[l, j], 1.0), (y[l, j], -G)], hi=0)
                P.row([(y[l, j], 1.0), (h[l, j], -1.0)], hi=0)
            P.row([(h[l, j], 1.0) for j in U], G, G)
            P.row([(p[l, j], 1.0) for j in U], 1, 1)
            P.row([(f[l, j], 1.0) for j in U], 1, 1)
        self.h, self.p, self.f = h, p, f
        self.sc = np.full(shape, -1)  # sharded: shards 1..N-1 per device (interchangeable)
        if N > 1:
            self._shards(model, ffn_t, H)

        for l in range(L):
            # x -> proj(l) -> ffn(l): products of consecutive one-hot vectors with both
            # marginals (a path, so the LP relaxation is tight); a down link gets no product
            # variable, which forbids the pair
            if l == 0:
                P.row([(R[0], 1.0), *((p[0, b], -H[src, b]) for b in U if H[src, b] > 0)], lo=0)
            else:
                e = self._product(f[l - 1], p[l])
                P.row([(R[l], 1.0), *((v, -H[a, b]) for (a, b), v in e.items() if H[a, b] > 0)], lo=0)
            if N == 1:
                for (b, c), v in self._product(p[l], f[l]).items():
                    P.c[v] = I * H[b, c]

            # head devices: x arrives (A_j), h heads run, outputs go to proj; y = 0 forces h = 0,
            # so the big-M on y only has to cover A_j and an empty frame
            for j in U:
                if l == 0:
                    A, a_const, a_max = [], H[src, j], H[src, j]
                    if down[src, j]:
                        P.row([(y[0, j], 1.0)], hi=0)
                else:
                    A = [(f[l - 1, a], -H[a, j]) for a in U if a != j and H[a, j] > 0]
                    a_const, a_max = 0.0, max(H[a, j] for a in U if not down[a, j])
                    for a in U:
                        if down[a, j]:
                            P.row([(f[l - 1, a], 1.0), (y[l, j], 1.0)], hi=1)
                # no transfer (proj on j; a lower bound wherever proj is)
                P.row([(R[l], 1.0), *A, (h[l, j], -head_t[j]), (y[l, j], -a_max)], lo=a_const - a_max)
                for b in U:
                    if b == j:
                        continue
                    if down[j, b]:
                        P.row([(y[l, j], 1.0), (p[l, b], 1.0)], hi=1)
                        continue
                    # the frame of k groups: max(0, k opg + FO - burst) / rate + lat, a max of
                    # two lines in k; the flat one matters only when the burst covers FO
                    per_k = opg / rate[j, b] / tau
                    lines = [(head_t[j] + per_k, ((FO - burst[j, b]) / rate[j, b] + lat[j, b]) / tau)]
                    if burst[j, b] > FO:
                        lines.append((head_t[j], lat[j, b] / tau))
                    for slope, base in lines:
                        My = max(0.0, a_max + base)
                        Mp = a_max + G * slope + base
                        P.row([(R[l], 1.0), *A, (h[l, j], -slope), (y[l, j], -My), (p[l, b], -Mp)],
                              lo=a_const + base - My - Mp)
                    # x entered the layer at j: its outputs follow the residual on j -> b
                    if l == 0 and j != src:
                        continue
                    slope = per_k
                    base = ((model.hidden + FO - burst[j, b]) / rate[j, b] + lat[j, b]) / tau
                    M = max(0.0, base + G * slope)
                    if M <= 0.0:
                        continue
                    terms = [(R[l], 1.0), (h[l, j], -slope), (y[l, j], -M), (p[l, b], -M)]
                    lo = base - 2 * M
                    if l > 0:
                        terms.append((f[l - 1, j], -M))
                        lo -= M
                    P.row(terms, lo=lo)

        # memory with caches at n_end (sharded: f is shard 0, the largest; sc the others)
        nb = {k: float(cost.block_bytes(s, k, snap.n_end)) for k in ("head", "proj", "ffn")}
        for j in U:
            P.row([(v[l, j], nb[k]) for l in range(L) for v, k in ((h, "head"), (p, "proj"), (f, "ffn"))]
                  + [(int(self.sc[l, j]), float(nb["ffn"])) for l in range(L) if N > 1],
                  hi=float(snap.devices[j].capacity))

        self.m: dict[tuple[int, int, int], int] = {}
        self.ms: dict[tuple[int, int, int], int] = {}  # shard flows (sharded models)
        # a shard but 0 (no down bias): what it moves
        self.shard_mb = float(cost.block_bytes(s, s.blocks[s.position("ffn", 0, 1)], snap.seq_len)
                              + cost.FRAME_OVERHEAD) if s.sharded else 0.0
        if views is not None:
            self._migration(views)

    def _shards(self, model: LatencyModel, ffn_t: np.ndarray, H: np.ndarray) -> None:
        """Sharded models: per layer and device sc (shards 1..N-1 there, interchangeable) and
        ys (any shard there, shard 0 included); Q_l >= the time from proj's output to the
        layer's output on shard 0's device f: per device j its arrival sum_b H[b,j] p_b plus
        its shards' job, plus (j not f) the frame of their partial sum to f, a max of two
        lines in the shard count as for the head outputs (exact for N <= 16: the frame grows
        by one byte per shard)."""
        s, snap, P, U = self.spec, self.snap, self.P, self.U
        L, N, I, tau = s.layers, s.ffn_shards, snap.interval, self.tau
        rate, lat, burst, down = snap.rate, snap.latency, snap.burst, self.down
        p, f, sc = self.p, self.f, self.sc
        P0 = float(model.partial[0])
        pb = float(model.partial[1] - model.partial[0])
        for l in range(L):
            ys = {}
            for j in U:
                sc[l, j] = P.var(0, N - 1, integer=True)
                ys[j] = P.var(0, 1, integer=True)
                P.row([(int(sc[l, j]), 1.0), (int(f[l, j]), 1.0), (ys[j], -N)], hi=0)
                P.row([(ys[j], 1.0), (int(sc[l, j]), -1.0), (int(f[l, j]), -1.0)], hi=0)
            P.row([(int(sc[l, j]), 1.0) for j in U], N - 1, N - 1)
            Q = P.var(0.0, math.inf, cost=I)
            for j in U:
                for b in U:
                    if b != j and down[b, j]:  # proj's output cannot reach j
                        P.row([(int(p[l, b]), 1.0), (ys[j], 1.0)], hi=1)
                A = [(int(p[l, b]), -H[b, j]) for b in U if b != j and H[b, j] > 0]
                M1 = max([H[b, j] for b in U if b != j] + [0.0])
                mine = [(int(sc[l, j]), -ffn_t[j]), (int(f[l, j]), -ffn_t[j])]
                P.row([(Q, 1.0), *A, *mine, (ys[j], -M1)], lo=-M1)
                for c in U:
                    if c == j:
                        continue
                    if down[j, c]:
                        P.row([(ys[j], 1.0), (int(f[l, c]), 1.0)], hi=1)
                        continue
                    per_k = pb / rate[j, c] / tau
                    lines = [(ffn_t[j] + per_k, ((P0 - burst[j, c]) / rate[j, c] + lat[j, c]) / tau)]
                    if burst[j, c] > P0:
                        lines.append((ffn_t[j], lat[j, c] / tau))
                    for slope, base in lines:
                        My = max(0.0, M1 + base)
                        Mf = M1 + N * slope + base
                        P.row([(Q, 1.0), *A, (int(sc[l, j]), -slope), (int(f[l, j]), -slope), (ys[j], -My),
                               (int(f[l, c]), -Mf)], lo=base - My - Mf)

    def _product(self, u: np.ndarray, v: np.ndarray) -> dict[tuple[int, int], int]:
        """e[a,b] = u[a] v[b] for one-hot u, v over the usable devices (pairs over a down
        link left out), as continuous variables with both marginals."""
        P, U = self.P, self.U
        e = {(a, b): P.var(0.0, 1.0) for a in U for b in U if not self.down[a, b]}
        for a in U:
            P.row([(u[a], -1.0), *((x, 1.0) for (aa, _), x in e.items() if aa == a)], 0, 0)
        for b in U:
            P.row([(v[b], -1.0), *((x, 1.0) for (_, bb), x in e.items() if bb == b)], 0, 0)
        return e

    def _migration(self, views: list) -> None:
        """Head flows m[l,a,c] out of the current devices, proj/ffn moves, and per link
        D >= (bytes - burst) / rate + latency t[a,c], D >= latency t[a,c]."""
        snap, s, P, U = self.snap, self.spec, self.P, self.U
        rate, lat, burst, down, tau = snap.rate, snap.latency, snap.burst, self.down, self.tau
        mb = {k: float(cost.block_bytes(s, k, snap.seq_len) + cost.FRAME_OVERHEAD) for k in ("head", "proj", "ffn")}
        links: dict[tuple[int, int], list[tuple[int, float, int]]] = {}  # (variable, bytes, upper bound)
        for l, v in enumerate(views):
            into: dict[int, list[int]] = {}
            out: dict[int, list[int]] = {}
            for a, k in v.heads.items():
                for c in U:
                    if c != a and not down[a, c]:
                        m = self.m[l, a, c] = P.var(0, k, integer=True)
                        links.setdefault((a, c), []).append((m, mb["head"], k))
                        into.setdefault(c, []).append(m)
                        out.setdefault(a, []).append(m)
                if out.get(a):  # a head moves once: no relaying through another device
                    P.row([(m, 1.0) for m in out[a]], hi=k)
            for c in range(snap.n_devices):
                k = v.heads.get(c, 0)
                terms = [(m, -1.0) for m in into.get(c, [])] + [(m, 1.0) for m in out.get(c, [])]
                if self.h[l, c] >= 0:
                    terms.append((int(self.h[l, c]), 1.0))
                if terms:
                    P.row(terms, k, k)
                elif k:
                    raise Infeasible(f"optimal: the heads of layer {l} on {snap.devices[c].name} "
                                     f"can go nowhere (no usable device over a link that is up)")
            for a, var, kind in ((v.proj, self.p, "proj"), (v.ffn, self.f, "ffn")):
                for c in U:
                    if c != a and not down[a, c]:
                        links.setdefault((a, c), []).append((int(var[l, c]), mb[kind], 1))
            if s.sharded:  # shards 1..N-1 flow like heads
                self._shard_flows(l, links)
        D = P.var(0.0, math.inf, cost=1.0)
        for (a, c), items in links.items():
            t = P.var(0, 1, integer=True)
            for i, _, ub in items:
                P.row([(i, 1.0), (t, -float(ub))], hi=0)
            r = rate[a, c] * tau
            P.row([(D, 1.0), *((i, -nbytes / r) for i, nbytes, _ in items), (t, -lat[a, c] / tau)],
                  lo=-burst[a, c] / r)
            if burst[a, c] > 0 and lat[a, c] > 0:
                P.row([(D, 1.0), (t, -lat[a, c] / tau)], lo=0)
        # valid cuts (redundant for integers): a block moves over one link, so D is at least
        # its own transfer time wherever it goes; k heads leaving a together are a convex
        # combination of such times. Without them the LP relaxation splits a block over
        # many links and D looks small.
        for l, v in enumerate(views):
            for a, var, kind in ((v.proj, self.p, "proj"), (v.ffn, self.f, "ffn")):
                P.row([(D, 1.0), *((int(var[l, c]), -self._mig_t(a, c, mb[kind]))
                                   for c in U if c != a and not down[a, c])], lo=0)
            for a, k in v.heads.items():
                P.row([(D, 1.0), *((self.m[l, a, c], -self._mig_t(a, c, mb["head"]) / k)
                                   for c in U if (l, a, c) in self.m)], lo=0)
            for a, k in (self._cur_shards(l).items() if s.sharded else ()):
                P.row([(D, 1.0), *((self.ms[l, a, c], -self._mig_t(a, c, self.shard_mb) / k)
                                   for c in U if (l, a, c) in self.ms)], lo=0)

    def _cur_shards(self, l: int) -> dict[int, int]:
        """Device -> shards 1..N-1 of layer l there in the current placement."""
        assert self.snap.current is not None
        out: dict[int, int] = {}
        for i in list(self.spec.shard_range(l))[1:]:
            j = self.snap.current.assign[i]
            out[j] = out.get(j, 0) + 1
        return out

    def _shard_flows(self, l: int, links: dict[tuple[int, int], list[tuple[int, float, int]]]) -> None:
        """Flows ms[l,a,c] of shards 1..N-1 out of their current devices, as for heads."""
        snap, P, U, down = self.snap, self.P, self.U, self.down
        into: dict[int, list[int]] = {}
        out: dict[int, list[int]] = {}
        cur = self._cur_shards(l)
        for a, k in cur.items():
            for c in U:
                if c != a and not down[a, c]:
                    m = self.ms[l, a, c] = P.var(0, k, integer=True)
                    links.setdefault((a, c), []).append((m, self.shard_mb, k))
                    into.setdefault(c, []).append(m)
                    out.setdefault(a, []).append(m)
            if out.get(a):
                P.row([(m, 1.0) for m in out[a]], hi=k)
        for c in range(snap.n_devices):
            k = cur.get(c, 0)
            terms = [(m, -1.0) for m in into.get(c, [])] + [(m, 1.0) for m in out.get(c, [])]
            if self.sc[l, c] >= 0:
                terms.append((int(self.sc[l, c]), 1.0))
            if terms:
                P.row(terms, k, k)
            elif k:
                raise Infeasible(f"optimal: the ffn shards of layer {l} on {snap.devices[c].name} "
                                 f"can go nowhere (no usable device over a link that is up)")

    def _mig_t(self, a: int, c: int, nbytes: float) -> float:
        snap = self.snap
        return xfer_time(nbytes, snap.rate[a, c], snap.latency[a, c], snap.burst[a, c]) / self.tau

    def placement(self, x: np.ndarray) -> Placement:
        """The solution as a Placement: heads stay where they are up to the new count and
        the rest move along the flows (cycles cancelled), lowest group index first."""
        s, snap = self.spec, self.snap
        L, V = s.layers, snap.n_devices
        val = np.rint(x).astype(np.int64)
        cur = snap.current
        assign: list[int] = []
        for l in range(L):
            count = [int(val[self.h[l, j]]) if self.h[l, j] >= 0 else 0 for j in range(V)]
            proj = max(range(V), key=lambda j: val[self.p[l, j]] if self.p[l, j] >= 0 else -1)
            ffn = max(range(V), key=lambda j: val[self.f[l, j]] if self.f[l, j] >= 0 else -1)
            hr = s.head_range(l)
            heads = _follow(count, self.m, l, val, None if cur is None else cur.assign[hr.start:hr.stop], V)
            if [heads.count(j) for j in range(V)] != count:
                raise RuntimeError(f"optimal: head flows of layer {l} do not match the counts {count}")
            assign += [*heads, proj, ffn]
            if s.sharded:
                sc = [int(val[self.sc[l, j]]) if self.sc[l, j] >= 0 else 0 for j in range(V)]
                sr = list(s.shard_range(l))[1:]
                rest = _follow(sc, self.ms, l, val, None if cur is None else [cur.assign[i] for i in sr], V)
                if [rest.count(j) for j in range(V)] != sc:
                    raise RuntimeError(f"optimal: shard flows of layer {l} do not match the counts {sc}")
                assign += rest
        return Placement(s, tuple(assign))


def _follow(count: list[int], flows: dict[tuple[int, int, int], int], l: int, val: np.ndarray,
            now: Sequence[int] | None, V: int) -> list[int]:
    """Interchangeable blocks (a layer's heads, or its shards but 0) from per-device counts:
    without a current placement in device order; else each stays where it is up to the new
    count and the rest follow the flows (cycles cancelled), lowest index first."""
    out = [-1] * sum(count)
    if now is None:
        g = 0
        for j in range(V):
            for _ in range(count[j]):
                out[g] = j
                g += 1
        return out
    flow = np.zeros((V, V), dtype=np.int64)
    for (ll, a, c), i in flows.items():
        if ll == l:
            flow[a, c] = val[i]
    _cancel_cycles(flow)
    for a in range(V):
        mine = [g for g in range(len(now)) if now[g] == a]
        stay = len(mine) - int(flow[a].sum())
        dest = [a] * stay + [c for c in range(V) for _ in range(flow[a, c])]
        for g, j in zip(mine, dest, strict=True):
            out[g] = j
    return out


def _cancel_cycles(flow: np.ndarray) -> None:
    """Remove directed cycles from an integer flow in place (each cancellation only takes
    bytes off links, so the migration delay cannot grow)."""
    V = len(flow)
    while True:
        cycle = _find_cycle(flow, V)
        if cycle is None:
            return
        edges = list(zip(cycle, cycle[1:] + cycle[:1], strict=True))
        k = min(flow[a, c] for a, c in edges)
        for a, c in edges:
            flow[a, c] -= k


def _find_cycle(flow: np.ndarray, V: int) -> list[int] | None:
    state = [0] * V  # 0 new, 1 on the stack, 2 done
    stack: list[int] = []

    def visit(a: int) -> list[int] | None:
        state[a] = 1
        stack.append(a)
        for c in range(V):
            if flow[a, c] > 0:
                if state[c] == 1:
                    return stack[stack.index(c):]
                if state[c] == 0 and (found := visit(c)) is not None:
                    return found
        stack.pop()
        state[a] = 2
        return None

    for a in range(V):
        if state[a] == 0 and (found := visit(a)) is not None:
            return found
    return None


class Optimal:
    """Exact minimum of the epoch objective (interval x per-token latency + migration delay).
    Raises TooLarge beyond the size limit, Infeasible when nothing fits, NotOptimal when
    HiGHS stops (e.g. at `time_limit_s`) without proving optimality; `last` describes the
    last solve."""

    name = "optimal"
    dynamic = True

    def __init__(self, time_limit_s: float = 10.0, max_size: int = MAX_SIZE, max_layers: int = MAX_LAYERS,
                 presolve: bool = False) -> None:
        self.time_limit_s = time_limit_s
        self.max_size = max_size
        self.max_layers = max_layers
        self.presolve = presolve
        self.last: Solve | None = None

    def place(self, snap: Snapshot) -> Placement:
        L, V = snap.spec.layers, snap.n_devices
        if L * V * V > self.max_size or L > self.max_layers:
            raise TooLarge(f"optimal: {L} layers x {V} devices is too large: the limit is layers x "
                           f"devices^2 <= {self.max_size} (here {L * V * V}) and layers <= {self.max_layers}")
        form = _Formulation(snap)
        res = form.P.solve({"time_limit": self.time_limit_s, "mip_rel_gap": 0.0, "mip_abs_gap": 0.0,
                            "presolve": self.presolve, "mip_feasibility_tolerance": MIP_FEASIBILITY_TOL})
        if res.status == 2:
            raise Infeasible("optimal: no placement fits in memory using only links that are up")
        if res.status != 0 or res.x is None:
            raise NotOptimal(f"optimal: HiGHS stopped without proving optimality ({res.message})")
        p = form.placement(res.x)
        bad = violations(snap, p)
        if bad:
            raise NotOptimal(f"optimal: the solution violates memory after rounding: {'; '.join(bad)}")
        value = form.tau * res.fun + snap.interval * form.lm
        self.last = Solve(float(value), float(epoch_objective(snap, p)), len(form.P.c), len(form.P.rows))
        return p
