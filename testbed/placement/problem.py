"""The placement problem (pure): snapshot, placement, per-token latency estimate, objective.

Owns what every algorithm shares:
- `Snapshot`: what the controller believes at a decision epoch (device compute rates and
  memory, link rates and latencies, the current placement, sequence length, interval);
- `Placement`: a device index per block of `spec.blocks`;
- `LatencyModel`: the critical path of the per-token dataflow below under the cost model,
  per layer, so algorithms can re-evaluate one layer after moving a block;
- memory need per device, migration delay and the epoch objective
  `interval x per-token latency + migration delay`.
No asyncio, no torch, no IO: times and states come in as arguments.

Dataflow per token and layer l (u = device of ffn(l-1), the source for l = 0), as the
device agents run it:
x goes u -> every head device of l and u -> proj(l) (one message per device); a head device
computes all its heads of l as one job and sends their outputs to proj(l) in one frame;
proj(l) starts when every output and the residual have arrived, then sends to ffn(l). After
the last layer the hidden state returns to the source, which runs the LM head. Co-located
transfers are free; distinct ordered pairs are independent links, and each link is FIFO:
when u holds heads of l and proj(l) is elsewhere, the head outputs from u queue on the link
u -> proj(l) behind the residual x sent there before them (the one place in a token where
two frames share a link; `LatencyModel.layer_time` prices it). With ffn shards (N > 1) proj(l)
sends its output to every device holding shards of l; each runs its shards as one job and
(but shard 0's device) sends their summed partial output to shard 0's device, where the
layer's output is ready when the last sum is in; shard 0's device is then u for l + 1.
Frame sizes are the encoded
messages (`cost.hidden_bytes`, `cost.output_bytes`, `cost.head_output_frame`) plus what the
transport adds (`Snapshot.frame_extra`). Every link is assumed idle with full burst credit
when a token starts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np

from ..model import cost
from ..model.spec import Block, ModelSpec


class Infeasible(Exception):
    """No placement satisfies the memory constraints."""


@dataclass(frozen=True)
class DeviceState:
    name: str
    flops: float  # effective FLOP/s now
    capacity: int  # bytes blocks may use: what the planner fills (the soft limit by default)
    host_blocks: bool = True
    alive: bool = True
    hard_capacity: int = -1  # bytes up to the hard limit (-1: same as capacity)
    bandwidth: float = math.inf  # effective memory bandwidth now, bytes/s (inf: the FLOP model)

    def __post_init__(self) -> None:
        if self.hard_capacity < 0:
            object.__setattr__(self, "hard_capacity", self.capacity)

    @property
    def usable(self) -> bool:
        return self.host_blocks and self.alive

    @classmethod
    def from_memory(cls, name: str, flops: float, mem: Mapping[str, int], host_blocks: bool = True,
                    alive: bool = True, bandwidth: float = math.inf) -> DeviceState:
        """From a device's memory counters (`MemoryBudget.counters()`): blocks may use what
        the soft limit (`high`) leaves after the source's share, co-tenants (events' and the
        background load's) and pending reservations; `hard_capacity` is the same up to `max`."""
        other = mem["fixed_bytes"] + mem["pressure_bytes"] + mem["background_bytes"] + mem["reserved_bytes"]
        return cls(name, flops, max(0, mem["high_bytes"] - other), host_blocks, alive,
                   max(0, mem["max_bytes"] - other), bandwidth)

    def hard(self) -> DeviceState:
        return replace(self, capacity=self.hard_capacity)


@dataclass(frozen=True)
class Snapshot:
    spec: ModelSpec
    devices: tuple[DeviceState, ...]
    rate: np.ndarray  # [V, V] bytes/s of the directed link i -> j (inf on the diagonal)
    latency: np.ndarray  # [V, V] seconds (0 on the diagonal)
    burst: np.ndarray  # [V, V] bytes of burst credit
    source: int
    seq_len: int  # positions held in every cache now
    interval: int = 1  # tokens until the next decision epoch
    current: Placement | None = None
    context: dict = field(default_factory=dict, compare=False)  # free-form (e.g. memory in use)
    frame_extra: int = 0  # bytes the transport adds to every frame (websocket: its "due" entry)
    migration: str = "stop_and_copy"  # how blocks move (stop_and_copy | pre_copy): `migration_cost`

    @property
    def n_devices(self) -> int:
        return len(self.devices)

    def index(self, name: str) -> int:
        for i, d in enumerate(self.devices):
            if d.name == name:
                return i
        raise KeyError(name)

    @property
    def n_end(self) -> int:
        """Cache length at the end of the coming interval (what must fit)."""
        return self.seq_len + self.interval

    @property
    def n_mid(self) -> float:
        """Mean sequence length over the coming interval (for the latency estimate)."""
        return self.seq_len + (self.interval + 1) / 2

    def with_(self, **kw: Any) -> Snapshot:
        return replace(self, **kw)

    @classmethod
    def build(cls, spec: ModelSpec, devices: Sequence[DeviceState], links: Sequence[np.ndarray], source: int,
              seq_len: int, interval: int = 1, current: Placement | None = None) -> Snapshot:
        """The one way to make a snapshot: `links` is (rate, latency) or (rate, latency,
        burst) as [V, V] matrices (`link_matrices` builds them; no burst credit when left
        out)."""
        rate, latency, *rest = links
        burst = rest[0] if rest else np.zeros_like(rate, dtype=float)
        return cls(spec, tuple(devices), rate, latency, burst, source, seq_len, interval, current)

    def hard(self) -> Snapshot:
        """The same view with every device filled up to its hard limit."""
        return replace(self, devices=tuple(d.hard() for d in self.devices))


def link_matrices(n: int, entries: Iterable[tuple[int, int, float, float, float]] = (), rate: float = math.inf,
                  latency: float = 0.0, burst: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[n, n] rate (bytes/s), latency (s) and burst (bytes) of every directed link: `rate`,
    `latency` and `burst` everywhere, then each (i, j, rate, latency, burst) of `entries`;
    a device to itself is free (inf, 0, 0)."""
    r, lat, b = np.full((n, n), float(rate)), np.full((n, n), float(latency)), np.full((n, n), float(burst))
    for i, j, x, y, z in entries:
        r[i, j], lat[i, j], b[i, j] = x, y, z
    np.fill_diagonal(r, np.inf)
    np.fill_diagonal(lat, 0.0)
    np.fill_diagonal(b, 0.0)
    return r, lat, b


@dataclass(frozen=True)
class Placement:
    """Device index for every block of `spec.blocks` (same order)."""

    spec: ModelSpec
    assign: tuple[int, ...]

    @classmethod
    def from_names(cls, spec: ModelSpec, mapping: dict[str, int]) -> Placement:
        return cls(spec, tuple(mapping[b.name] for b in spec.blocks))

    def device_of(self, block: Block | str) -> int:
        name = block if isinstance(block, str) else block.name
        return self.assign[block_index(self.spec)[name]]

    def items(self) -> Iterable[tuple[Block, int]]:
        return zip(self.spec.blocks, self.assign, strict=True)

    def moves(self, new: Placement) -> list[tuple[Block, int, int]]:
        """(block, from, to) for every block that `new` puts elsewhere."""
        return [(b, a, c) for b, a, c in zip(self.spec.blocks, self.assign, new.assign, strict=True) if a != c]

    def names(self, devices: Sequence[DeviceState] | Sequence[str]) -> dict[str, str]:
        dn = [d if isinstance(d, str) else d.name for d in devices]
        return {b.name: dn[i] for b, i in self.items()}


@lru_cache(maxsize=32)
def block_index(spec: ModelSpec) -> dict[str, int]:
    """Block name -> position in `spec.blocks` (cached per spec, bounded)."""
    return {b.name: i for i, b in enumerate(spec.blocks)}


# ---------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class LayerView:
    """Where the blocks of one layer sit: head group counts per device, proj, ffn."""

    heads: dict[int, int]  # device -> number of head blocks of this layer
    proj: int
    ffn: int  # the device of the ffn (of shard 0 when sharded: where the output is summed)
    shards: dict[int, int] = field(default_factory=dict)  # device -> ffn shards (sharded only)


def layer_views(p: Placement) -> list[LayerView]:
    s, a = p.spec, p.assign
    out = []
    for l in range(s.layers):
        r = s.head_range(l)
        heads: dict[int, int] = {}
        for j in a[r.start:r.stop]:
            heads[j] = heads.get(j, 0) + 1
        shards: dict[int, int] = {}
        if s.sharded:
            for j in a[r.stop + 1:r.stop + 1 + s.ffn_shards]:
                shards[j] = shards.get(j, 0) + 1
        out.append(LayerView(heads, a[r.stop], a[r.stop + 1], shards))  # proj and ffn follow the heads
    return out


# ---------------------------------------------------------------------------- latency


def xfer_time(nbytes: float, rate: float, latency: float, burst: float = 0.0) -> float:
    """Seconds for a message on an idle link (full burst credit); inf if the link is down
    (what a down link holds never arrives while it is down)."""
    if rate <= 0:
        return math.inf
    return max(0.0, nbytes - burst) / rate + latency


class LatencyModel:
    """Per-token latency of a placement: the critical path of the dataflow, per layer.
    `tokens` > 1 models a prefill chunk (T positions in one pass).

    What it models, as the emulator does it: compute jobs take FLOPs / FLOP/s, or on a
    device with a memory bandwidth the roofline max(FLOPs / FLOP/s, bytes / bandwidth)
    (`cost.roofline_time`, `cost.span_bytes`: a head job of k groups moves k groups'
    bytes); a frame of
    b bytes on an idle link with burst credit B takes max(0, b - B) / rate + latency; the
    frames are the encoded messages with the transport's `frame_extra` (x and y `hidden`,
    z `output`, h `head_bytes(k)`; within a few bytes, see `cost.head_output_frame`);
    two frames on one link in one layer (x then h from u to proj) go through its token
    bucket one after the other. Not modelled: burst credit that an earlier frame of the same
    token used and that has not refilled (every frame but the queued h gets the full
    credit), and host time (none in virtual time)."""

    def __init__(self, snap: Snapshot, tokens: int = 1) -> None:
        s = self.spec = snap.spec
        self.snap = snap
        self.tokens = tokens
        self.flops = np.array([d.flops for d in snap.devices], dtype=float)
        self.bandwidth = np.array([d.bandwidth for d in snap.devices], dtype=float)
        # some device is memory-bound for some job: times come from the roofline
        self.bound = bool(np.isfinite(self.bandwidth).any())
        self.rate, self.lat, self.burst = snap.rate, snap.latency, snap.burst
        extra = snap.frame_extra
        self.hidden = cost.hidden_bytes(s, tokens, extra)  # x into a layer, y from proj to ffn
        self.output = cost.output_bytes(s, tokens, extra)  # z from the last ffn to the source
        # the head-output frame of k groups is head_base + k * head_per_group bytes
        self.head_per_group, self.head_base = cost.head_output_frame(s, tokens, extra)
        # transfer time of one hidden-state frame on every link, and of the last one home
        self.hidden_t = self.xfer_matrix(self.hidden)
        self.tail_t = self.xfer_matrix(self.output)
        self.proj_flops = cost.span_flops(s, "proj", 0, tokens)
        self.ffn_flops = cost.span_flops(s, "ffn", 0, tokens)
        self.proj_bytes = cost.span_bytes(s, "proj", 0, tokens)
        self.ffn_bytes = cost.span_bytes(s, "ffn", 0, tokens)
        self.shards = s.ffn_shards
        # the frame of the summed partial outputs of k shards (sharded models)
        self.partial = [cost.partial_bytes(s, k, tokens, extra) for k in range(s.ffn_shards + 1)]
        self.src = snap.source
        # the same figures as Python floats, for the per-layer arithmetic below: the local
        # search prices thousands of candidate steps per decision, and numpy's indexing of one
        # element costs more than the arithmetic on it (the values, and so the results, are
        # the same doubles)
        self._flops, self._bw = self.flops.tolist(), self.bandwidth.tolist()
        self._hid = self.hidden_t.tolist()
        self._rate, self._lat, self._burst = snap.rate.tolist(), snap.latency.tolist(), snap.burst.tolist()
        self._proj_t = [self.time(j, self.proj_flops, self.proj_bytes) for j in range(len(self._flops))]
        self._ffn_t = [self.time(j, self.ffn_flops, self.ffn_bytes) for j in range(len(self._flops))]
        self._head_job: dict[float, tuple[float, float]] = {}  # n -> (FLOPs, bytes) of one head block
        self.lm_time = self.time(self.src, cost.source_flops(s), cost.source_bytes(s))

    def time(self, j: int, flops: float, nbytes: float) -> float:
        """Seconds of a job on device j (`cost.roofline_time`: flops / rate without a bandwidth)."""
        return cost.roofline_time(flops, nbytes, self._flops[j], self._bw[j])

    def times(self, flops: float | np.ndarray, nbytes: float | np.ndarray) -> np.ndarray:
        """`time` of a job on every device at once ([V]; flops and nbytes scalars or [V])."""
        t = flops / self.flops
        if not self.bound:
            return t
        with np.errstate(divide="ignore"):
            return np.maximum(t, nbytes / self.bandwidth)

    def xfer_matrix(self, nbytes: float) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.maximum(0.0, nbytes - self.burst) / self.rate + self.lat
        t[self.rate <= 0] = np.inf  # a link that is down carries nothing (not even burst credit)
        np.fill_diagonal(t, 0.0)
        return t

    def xfer(self, a: int, b: int, nbytes: float) -> float:
        if a == b:
            return 0.0
        return xfer_time(nbytes, self._rate[a][b], self._lat[a][b], self._burst[a][b])

    def head_bytes(self, k: int) -> int:
        """Bytes of the frame carrying k head blocks' outputs of one layer."""
        return self.head_base + k * self.head_per_group

    def head_flops(self, n: float) -> float:
        """One head block's FLOPs for the step that ends at sequence length n."""
        return cost.span_flops(self.spec, "head", n - self.tokens, self.tokens)

    def head_bytes_moved(self, n: float) -> float:
        """Bytes one head block's job moves for the step that ends at sequence length n."""
        return cost.span_bytes(self.spec, "head", n - self.tokens, self.tokens)

    def layer_time(self, u: int, heads: dict[int, int], proj: int, ffn: int, n: float,
                   shards: dict[int, int] | None = None) -> float:
        """Time from x being ready on device u to the layer's output being ready on ffn.

        The head outputs of device j reach proj at x's arrival on j + their compute + their
        frame's transfer. When j is u itself and proj is elsewhere, u sent the residual x to
        proj just before, on the same link: the outputs cannot arrive before both frames
        have gone through that link's bucket back to back, i.e. before
        xfer(u, proj, x + h bytes) (with full credit at the start this is exact: the later
        of the two bounds is when the outputs arrive).
        `shards` (device -> ffn shards, sharded models): the output is ready on `ffn` (shard
        0's device) when the last device's summed partial output has arrived there."""
        job = self._head_job.get(n)
        if job is None:
            job = self._head_job[n] = (self.head_flops(n), self.head_bytes_moved(n))
        hf, hb = job
        hid, time, xfer = self._hid, self.time, self.xfer
        from_u = hid[u]
        ready = from_u[proj]  # the residual
        for j, k in heads.items():
            done = from_u[j] + time(j, k * hf, k * hb)
            h = self.head_base + k * self.head_per_group  # head_bytes(k)
            ready = max(ready, done + xfer(j, proj, h))
            if j == u and u != proj:  # queued behind the residual on the link u -> proj
                ready = max(ready, xfer(u, proj, self.hidden + h))
        done = ready + self._proj_t[proj]
        if not shards:
            return done + hid[proj][ffn] + self._ffn_t[ffn]
        return done + self.shards_time(proj, ffn, shards)

    def shards_time(self, proj: int, ffn: int, shards: dict[int, int]) -> float:
        """From proj's output being ready to the layer's output being ready on `ffn`, the
        device of shard 0: per device its shards' job, then (but on `ffn`) the frame of
        their summed partial outputs."""
        out = 0.0
        from_proj, time, xfer = self._hid[proj], self.time, self.xfer
        for j, k in shards.items():
            t = from_proj[j] + time(j, k * self.ffn_flops, k * self.ffn_bytes)
            if j != ffn:
                t += xfer(j, ffn, self.partial[k])
            out = max(out, t)
        return out

    def tail_time(self, last_ffn: int) -> float:
        """Last hidden state back to the source, then the LM head there."""
        return self.tail_t[last_ffn, self.src] + self.lm_time

    def token_time(self, p: Placement, n: float) -> float:
        """Per-token latency (s) when the new token is position n (1-based)."""
        u, total = self.src, 0.0
        for v in layer_views(p):
            total += self.layer_time(u, v.heads, v.proj, v.ffn, n, v.shards)
            u = v.ffn
        return total + self.tail_time(u)


def estimate_token_latency(snap: Snapshot, p: Placement, n: float | None = None) -> float:
    """Seconds per token for placement p (the next token by default)."""
    return LatencyModel(snap).token_time(p, snap.seq_len + 1 if n is None else n)


# ---------------------------------------------------------------------------- memory


def memory_need(snap: Snapshot, p: Placement, n: int | None = None) -> np.ndarray:
    """Bytes each device needs for its blocks with caches of n positions (default n_end)."""
    s, n = snap.spec, snap.n_end if n is None else n
    need = np.zeros(snap.n_devices, dtype=np.int64)
    sizes = {k: cost.block_bytes(s, k, n) for k in ("head", "proj", "ffn")}
    for b, j in p.items():
        need[j] += sizes[b.kind]
    return need


def violations(snap: Snapshot, p: Placement, n: int | None = None) -> list[str]:
    """Why p is not allowed (memory over capacity, unusable devices); empty if it is."""
    out = []
    need = memory_need(snap, p, n)
    for j, d in enumerate(snap.devices):
        if need[j] and not d.usable:
            out.append(f"{d.name} cannot host blocks")
        elif need[j] > d.capacity:
            out.append(f"{d.name} needs {need[j]} B > {d.capacity} B")
    return out


# ---------------------------------------------------------------------------- migration


def migration_delay(snap: Snapshot, moves: Sequence[tuple[Block, int, int]], n: int | None = None) -> float:
    """Time to apply moves: each moves weights + cache of n positions; moves on one link
    go one after another, different links in parallel."""
    if not moves:
        return 0.0
    s, n = snap.spec, snap.seq_len if n is None else n
    per_link: dict[tuple[int, int], float] = {}
    for b, a, c in moves:
        per_link[(a, c)] = per_link.get((a, c), 0.0) + cost.block_bytes(s, b, n) + cost.FRAME_OVERHEAD
    return max(xfer_time(nbytes, snap.rate[a, c], snap.latency[a, c], snap.burst[a, c])
               for (a, c), nbytes in per_link.items())


def inference_links(p: Placement, source: int) -> set[tuple[int, int]]:
    """The ordered device pairs a token's frames cross under `p` (the dataflow above)."""
    out: set[tuple[int, int]] = set()
    views = layer_views(p)
    for l, v in enumerate(views):
        up = source if l == 0 else views[l - 1].ffn
        out.update((up, j) for j in (*v.heads, v.proj))
        out.update((j, v.proj) for j in v.heads)
        out.add((v.proj, v.ffn))
    if views:
        out.add((views[-1].ffn, source))
    return {(a, b) for a, b in out if a != b}


def migration_cost(snap: Snapshot, moves: Sequence[tuple[Block, int, int]], saved_per_token: float = 0.0,
                   token_s: float = math.inf) -> float:
    """What applying `moves` costs the tokens, by the snapshot's mechanism (the epoch
    objective's migration term, and resource_aware's move rule).

    stop_and_copy: generation waits for the whole transfer (`migration_delay`).
    pre_copy: the expected stall (the last delta of `precopy.RULE.small_rows` positions per
    moved head over its link, its request and answer, and the routing round from the
    source) plus the interference with inference: each link that carries both the stages
    and a token's frames (under the placement in force) delays one token by its whole
    transfer (a link is FIFO), and the tokens produced while the stages cross still run on
    the placement in force: the switch waits for the first token boundary after them, so
    max(1, transfer / token_s) tokens forgo `saved_per_token` (what a token saves after
    the switch; 0 when not known)."""
    if snap.migration != "pre_copy" or not moves:
        return migration_delay(snap, moves)
    from .precopy import RULE  # the stage rule the controller executes

    s = snap.spec
    delta: dict[tuple[int, int], float] = {}
    for b, a, c in moves:
        rows = RULE.small_rows * cost.cache_bytes_per_token(s) if b.kind == "head" else 0
        delta[(a, c)] = delta.get((a, c), 0.0) + rows + cost.FRAME_OVERHEAD
    src = snap.source
    lat = snap.latency
    route = 2 * max(float(lat[src, j]) for j in range(snap.n_devices))
    stall = max(xfer_time(nbytes, snap.rate[a, c], lat[a, c], snap.burst[a, c]) + lat[src, a] + lat[c, src]
                for (a, c), nbytes in delta.items()) + route
    crossed = inference_links(snap.current, snap.source) if snap.current is not None else set()
    per_link = {(a, c) for _, a, c in moves}
    interference = sum(migration_delay(snap, [m for m in moves if (m[1], m[2]) == link])
                       for link in per_link if link in crossed)
    transfer = migration_delay(snap, moves)
    if not saved_per_token > 0:  # nothing to forgo (0, negative, or unknown)
        lag = 0.0
    elif not (math.isfinite(saved_per_token) and math.isfinite(token_s)):
        lag = transfer  # the placement in force cannot serve (a dead link): tokens wait for the copy
    else:
        lag = max(1.0, transfer / token_s) * saved_per_token
    return stall + interference + lag


def epoch_objective(snap: Snapshot, p: Placement, model: LatencyModel | None = None) -> float:
    """interval x per-token latency (at the interval's mean length) + migration cost."""
    model = model or LatencyModel(snap)
    t = model.token_time(p, snap.n_mid)
    if snap.current is None:
        return snap.interval * t
    moves = snap.current.moves(p)
    if snap.migration == "pre_copy" and moves:
        t0 = model.token_time(snap.current, snap.n_mid)
        mig = migration_cost(snap, moves, t0 - t, t0)
    else:
        mig = migration_delay(snap, moves)
    return snap.interval * t + mig
