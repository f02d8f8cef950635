"""The transformer, cut into placeable blocks, and the monolithic reference that reuses them.

Owns the torch code: seeded weights per block, `KVCache`, `HeadBlock` (one K/V group with
its own cache), `ProjBlock` (W_o + residual), `FfnBlock` (norm + MLP + residual),
`SourceBlock` (embedding, final norm, tied LM head) and `Reference` (prefill and greedy
decode on one machine). Device agents run exactly these classes, so the distributed run
and the reference execute the same arithmetic.
Does not own: sizes (spec.py), costs (cost.py), memory accounting (emulation/memory.py).

Tensor layout: activations are [T, D] (T tokens of one sequence, no batch dimension);
weights are stored [out, in] as in torch.nn.Linear.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F

from .spec import Block, ModelSpec

Tensors = dict[str, torch.Tensor]

# torch's intra-op threads in every process that runs blocks (agents, the reference): one by
# default, so that agents on a 2-core host do not fight over cores (TESTBED_TORCH_THREADS)
TORCH_THREADS = int(os.environ.get("TESTBED_TORCH_THREADS", "1"))

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------- weights


class WeightSource(Protocol):
    """Where a device gets the weights of a block it is told to load (seeded random
    weights, or a checkpoint on local storage)."""

    spec: ModelSpec

    def block(self, name: str) -> Tensors: ...

    def source(self) -> Tensors: ...


def _seed_for(seed: int, what: str) -> int:
    digest = hashlib.sha256(f"{seed}/{what}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class RandomWeights:
    """Gaussian initialisation, each block seeded from (seed, block name), so any
    process can build any block by itself and every run with a seed has the same model.
    The layer's pre-attention norm is seeded from (seed, layer) instead, so that all head
    blocks of a layer hold the same norm: the model is then an ordinary GPT-2 (one `ln_1`
    per layer), which transformers can check (tests/test_gpt_crosscheck.py)."""

    def __init__(self, spec: ModelSpec, seed: int = 0) -> None:
        self.spec = spec
        self.seed = seed
        self.dtype = TORCH_DTYPES[spec.dtype]

    def _gen(self, what: str) -> Callable[..., torch.Tensor]:
        g = torch.Generator().manual_seed(_seed_for(self.seed, what))

        def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
            return (torch.randn(*shape, generator=g) * std).to(self.dtype)

        return normal

    def _norm(self, normal: Callable[..., torch.Tensor], prefix: str = "norm") -> Tensors:
        D = self.spec.d_model
        out = {f"{prefix}.w": (1.0 + normal(D, std=0.1).float()).to(self.dtype)}
        if self.spec.norm == "layernorm":
            out[f"{prefix}.b"] = normal(D)
        return out

    def block(self, name: str) -> Tensors:
        s, b = self.spec, Block.parse(name)
        D, d, q, Fd = s.d_model, s.d_head, s.q_per_group, s.d_ff
        normal = self._gen(name)

        def mat(rows: int, cols: int) -> torch.Tensor:
            # std 2/sqrt(fan_in) keeps every layer's contribution comparable to the
            # embedding, so random models emit varied tokens instead of echoing the input
            return normal(rows, cols, std=2.0 / math.sqrt(cols))

        w: Tensors = {}
        if b.kind == "head":
            # one pre-attention norm per layer, as in GPT-2 and Llama: every head block of
            # the layer holds a copy of the same values, drawn from the layer's own stream
            w.update(self._norm(self._gen(f"attn_norm.{b.layer}")))
            w["wq"], w["wk"], w["wv"] = mat(q * d, D), mat(d, D), mat(d, D)
            if s.attn_bias:
                w["bq"], w["bk"], w["bv"] = normal(q * d), normal(d), normal(d)
        elif b.kind == "proj":
            w["wo"] = mat(D, D)
            if s.proj_bias:
                w["bo"] = normal(D)
        elif s.sharded:  # a slice of the layer's whole FFN, drawn from that block's stream
            return shard_ffn(s, RandomWeights(replace(s, ffn_shards=1), self.seed).block(f"ffn.{b.layer}"), b.index)
        else:
            w.update(self._norm(normal))
            if s.mlp == "swiglu":
                w["wg"], w["wu"], w["wd"] = mat(Fd, D), mat(Fd, D), mat(D, Fd)
            else:
                w["w1"], w["b1"] = mat(Fd, D), normal(Fd)
                w["w2"], w["b2"] = mat(D, Fd), normal(D)
        return w

    def source(self) -> Tensors:
        s = self.spec
        normal = self._gen("source")
        w = {"wte": normal(s.vocab, s.d_model)}
        if not s.tied_head:
            w["wout"] = normal(s.vocab, s.d_model)
        if s.positions == "learned":
            w["wpe"] = normal(s.context, s.d_model, std=0.01)
        w.update(self._norm(normal))
        return w


# ---------------------------------------------------------------------------- building blocks


def _norm(x: torch.Tensor, w: Tensors, spec: ModelSpec, prefix: str = "norm") -> torch.Tensor:
    # torch.rms_norm and torch.layer_norm: the ops F.rms_norm and F.layer_norm call, without
    # their Python wrappers (a few microseconds per call, on every block job)
    if spec.norm == "rmsnorm":  # x * rsqrt(mean(x^2) + eps) * w, one fused call (the same bits)
        if x.dtype == torch.float32:
            return torch.rms_norm(x, (x.shape[-1],), w[f"{prefix}.w"], spec.norm_eps)
        return torch.rms_norm(x.float(), (x.shape[-1],), None, spec.norm_eps).to(x.dtype) * w[f"{prefix}.w"]
    return torch.layer_norm(x, (spec.d_model,), w[f"{prefix}.w"], w[f"{prefix}.b"], spec.norm_eps)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, b)


ROPE_ROWS = 256  # the smallest rotary table; tables grow by doubling to cover a position


@functools.lru_cache(maxsize=32)
def _rope_table(d: int, base: float, freqs: tuple[float, ...], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation of positions 0 .. rows-1 as two [rows, 1, d/2, 2] factors, cos and sin
    laid out per pair as the rotation uses them: (cos_i, cos_i) and (-sin_i, sin_i). Built once per
    process for a head size, base and scaling, and sliced by every call (elementwise the same
    products as computing them for the call's own positions, so the same bits)."""
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)  # [d/2]
    if freqs:
        inv = inv / torch.tensor(freqs, dtype=torch.float32)
    ang = torch.arange(0, rows, dtype=torch.float32)[:, None] * inv[None, :]  # [rows, d/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    return torch.stack((cos, cos), dim=-1).contiguous(), torch.stack((-sin, sin), dim=-1).contiguous()


def rope(x: torch.Tensor, pos0: int, base: float, freqs: tuple[float, ...] = ()) -> torch.Tensor:
    """Rotary embedding on interleaved pairs (x0,x1), (x2,x3), ... as llama.cpp lays out
    Q/K rows. x: [T, heads, d]; positions pos0 .. pos0+T-1. `freqs`, when given, divides
    pair i's frequency by freqs[i] (llama.cpp's rope_freqs: Llama 3's long-context scaling).
    Each pair becomes (x0 cos - x1 sin, x1 cos + x0 sin), computed as x * (cos, cos) +
    swapped(x) * (-sin, sin): IEEE negation is exact and addition commutes, so these are the
    bits of the formula written out, in four torch calls instead of nine (on [T, heads, d/2, 2]
    views: no reshaping copies)."""
    T, h, d = x.shape
    rows = max(ROPE_ROWS, 1 << (pos0 + T - 1).bit_length())
    cos_t, sin_t = _rope_table(d, float(base), tuple(freqs), rows)
    xf = (x if x.dtype == torch.float32 else x.float()).view(T, h, d // 2, 2)
    out = (xf * cos_t[pos0:pos0 + T] + xf.flip(-1) * sin_t[pos0:pos0 + T]).view(T, h, d)  # flip: (x1, x0)
    return out if out.dtype == x.dtype else out.to(x.dtype)


class KVCache:
    """One K/V group's cache: rows 0..n-1 are positions. Storage grows by doubling, but
    `k`, `v` and `nbytes` cover exactly the n live positions (what the cost model counts)."""

    def __init__(self, d_head: int, dtype: torch.dtype, capacity: int = 32) -> None:
        self._k = torch.zeros(capacity, d_head, dtype=dtype)
        self._v = torch.zeros(capacity, d_head, dtype=dtype)
        self.n = 0

    @property
    def k(self) -> torch.Tensor:
        return self._k[: self.n]

    @property
    def v(self) -> torch.Tensor:
        return self._v[: self.n]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def before(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The K and V rows of positions 0 .. pos-1 (pos <= n), as views."""
        return self._k[:pos], self._v[:pos]

    def write(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store rows for positions pos..pos+T-1. Writing a position again (a retried
        token) overwrites it, so a retry never duplicates an entry."""
        if pos > self.n:
            raise ValueError(f"cache gap: writing position {pos} with {self.n} positions held")
        end = pos + k.shape[0]
        if end > self._k.shape[0]:
            cap = max(end, 2 * self._k.shape[0])
            for attr in ("_k", "_v"):
                old = getattr(self, attr)
                new = torch.zeros(cap, old.shape[1], dtype=old.dtype)
                new[: self.n] = old[: self.n]
                setattr(self, attr, new)
        self._k[pos:end] = k
        self._v[pos:end] = v
        self.n = max(self.n, end)

    def truncate(self, n: int) -> None:
        self.n = min(self.n, n)

    def state(self) -> Tensors:
        return {"k": self.k, "v": self.v}

    @classmethod
    def from_state(cls, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        c = cls(k.shape[1], k.dtype, capacity=max(32, k.shape[0]))
        c.write(0, k, v)
        return c


@dataclass
class HeadBlock:
    """One K/V group of a layer: norm, its Q/K/V slices (stored fused as one [(q+2)d, D]
    matrix: one product per token instead of three) and its own cache."""

    spec: ModelSpec
    w: Tensors
    cache: KVCache

    @classmethod
    def create(cls, spec: ModelSpec, w: Tensors) -> HeadBlock:
        fused = fuse_qkv(w)
        return cls(spec, fused, KVCache(spec.d_head, fused["wqkv"].dtype))

    def forward(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """x: [T, D] hidden states of positions pos..pos+T-1 -> [T, q*d] attention outputs;
        their K/V rows are written to the cache."""
        out, k, v = self.attend(x, pos)
        self.cache.write(pos, k, v)
        return out

    def attend(self, x: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` without its state change: the attention outputs [T, q*d] and the new
        K and V rows [T, d] that `forward` writes to the cache. It reads only the cache's
        positions before `pos`, so it may run ahead of the job that commits the rows (a
        device computing as soon as a frame's content arrives)."""
        s, w = self.spec, self.w
        T, d, q = x.shape[0], s.d_head, s.q_per_group
        if pos > self.cache.n:
            raise ValueError(f"cache gap: position {pos} with {self.cache.n} positions held")
        qkv = _linear(_norm(x, w, s), w["wqkv"], w.get("bqkv"))  # [T, (q+2)d]
        v = qkv[:, (q + 1) * d:]
        if s.positions == "rope":  # the queries and the key rotated in one call
            qk = rope(qkv[:, :(q + 1) * d].view(T, q + 1, d), pos, s.rope_base, s.rope_freqs)
            qs, k = qk[:, :q], qk[:, q]
        else:
            qs, k = qkv[:, : q * d].view(T, q, d), qkv[:, q * d:(q + 1) * d]
        held_k, held_v = self.cache.before(pos)
        K = torch.cat((held_k, k))  # [pos + T, d]
        V = torch.cat((held_v, v))
        att = torch.matmul(qs.transpose(0, 1), K.t()) / math.sqrt(d)  # [q, T, n]
        if T > 1:  # causal: query t (position pos+t) sees keys 0..pos+t
            mask = torch.arange(pos + T)[None, :] > (pos + torch.arange(T))[:, None]
            att = att.masked_fill(mask, float("-inf"))
        if att.dtype == torch.float32:
            att = torch.softmax(att, dim=-1)
        else:
            att = torch.softmax(att.float(), dim=-1).to(x.dtype)
        return torch.matmul(att, V).transpose(0, 1).reshape(T, q * d), k, v  # [T, q*d]


def block_shapes(spec: ModelSpec, kind: str, index: int = 0) -> dict[str, tuple[int, ...]]:
    """The tensors a live block of this kind (an ffn shard: its `index`) holds, with their
    shapes (what a migrated block's snapshot must carry)."""
    D, d, q, Fd = spec.d_model, spec.d_head, spec.q_per_group, spec.d_ff
    norm = {"norm.w": (D,), **({"norm.b": (D,)} if spec.norm == "layernorm" else {})}
    if kind == "head":
        out = {**norm, "wqkv": ((q + 2) * d, D)}
        if spec.attn_bias:
            out["bqkv"] = ((q + 2) * d,)
        return out
    if kind == "proj":
        return {"wo": (D, D), **({"bo": (D,)} if spec.proj_bias else {})}
    Fd = spec.d_shard  # an ffn shard (the whole FFN when unsharded); the down bias on shard 0
    if spec.mlp == "swiglu":
        return {**norm, "wg": (Fd, D), "wu": (Fd, D), "wd": (D, Fd)}
    return {**norm, "w1": (Fd, D), "b1": (Fd,), "w2": (D, Fd), **({"b2": (D,)} if index == 0 else {})}


def shard_ffn(spec: ModelSpec, w: Tensors, shard: int) -> Tensors:
    """Shard `shard` of a layer's whole FFN weights `w` (the unsharded block's): the norm,
    rows shard*F/N .. (shard+1)*F/N of the up (and gate) matrix and its bias, the same
    columns of the down matrix; the down bias, added once per layer, only on shard 0."""
    if not 0 <= shard < spec.ffn_shards:
        raise KeyError(f"ffn shard {shard} out of range (the model has {spec.ffn_shards})")
    f = spec.d_shard
    rows = slice(shard * f, (shard + 1) * f)
    out = {k: v for k, v in w.items() if k.startswith("norm.")}
    for k in ("wg", "wu", "w1", "b1"):
        if k in w:
            out[k] = w[k][rows].clone()
    for k in ("wd", "w2"):
        if k in w:
            out[k] = w[k][:, rows].contiguous()
    if "b2" in w and shard == 0:
        out["b2"] = w["b2"]
    return out


def fuse_qkv(w: Tensors) -> Tensors:
    """A head block's weights with W_q, W_k, W_v (and biases) as one matrix (and vector)."""
    if "wqkv" in w:
        return w
    out = {k: v for k, v in w.items() if k not in ("wq", "wk", "wv", "bq", "bk", "bv")}
    out["wqkv"] = torch.cat([w["wq"], w["wk"], w["wv"]])
    if "bq" in w:
        out["bqkv"] = torch.cat([w["bq"], w["bk"], w["bv"]])
    return out


@dataclass
class ProjBlock:
    """Output projection W_o of a layer plus the attention residual."""

    spec: ModelSpec
    w: Tensors

    def forward(self, heads: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """heads: [T, D] concatenated head outputs in head order; x: [T, D] residual."""
        return x + _linear(heads, self.w["wo"], self.w.get("bo"))


@dataclass
class FfnBlock:
    """Pre-FFN norm, the MLP (GELU or SwiGLU) and its residual."""

    spec: ModelSpec
    w: Tensors

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """An ffn shard's share of the layer's FFN output (no residual): its hidden units'
        contribution, plus the down bias on the shard that holds it (shard 0)."""
        w = self.w
        h = _norm(x, w, self.spec)
        if self.spec.mlp == "swiglu":
            return F.linear(F.silu(F.linear(h, w["wg"])) * F.linear(h, w["wu"]), w["wd"])
        return _linear(F.gelu(_linear(h, w["w1"], w["b1"]), approximate="tanh"), w["w2"], w.get("b2"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        h = _norm(x, w, self.spec)
        if self.spec.mlp == "swiglu":
            h = F.silu(F.linear(h, w["wg"])) * F.linear(h, w["wu"])
            return x + F.linear(h, w["wd"])
        return x + _linear(F.gelu(_linear(h, w["w1"], w["b1"]), approximate="tanh"), w["w2"], w["b2"])


@dataclass
class SourceBlock:
    """What stays on the source device: embedding, learned positions, final norm, LM head
    (the embedding matrix itself when tied, else `wout`)."""

    spec: ModelSpec
    w: Tensors

    def embed(self, tokens: list[int], pos: int) -> torch.Tensor:
        x = self.w["wte"][torch.tensor(tokens, dtype=torch.long)]
        if self.spec.positions == "learned":
            x = x + self.w["wpe"][pos : pos + len(tokens)]
        return x  # [T, D]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, D] final hidden states -> [T, V] float32 logits."""
        head = self.w["wte"] if self.spec.tied_head else self.w["wout"]
        return F.linear(_norm(x, self.w, self.spec), head).float()


def make_block(spec: ModelSpec, name: str, w: Tensors) -> HeadBlock | ProjBlock | FfnBlock:
    kind = Block.parse(name).kind
    if kind == "head":
        return HeadBlock.create(spec, w)
    return ProjBlock(spec, w) if kind == "proj" else FfnBlock(spec, w)


def sum_partials(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ffn shards' partial outputs of one layer, added in the order given."""
    acc = parts[0]
    for p in parts[1:]:
        acc = acc + p
    return acc


def concat_heads(outputs: dict[int, torch.Tensor], groups: int) -> torch.Tensor:
    """Head outputs keyed by group index -> [T, D] in head order (what W_o expects)."""
    return torch.cat([outputs[g] for g in range(groups)], dim=-1)


# ---------------------------------------------------------------------------- reference


class Reference:
    """The monolithic model: the same blocks run one after another on one machine."""

    def __init__(self, weights: WeightSource) -> None:
        s = self.spec = weights.spec
        self.source = SourceBlock(s, weights.source())
        self.heads = [[HeadBlock.create(s, weights.block(f"head.{l}.{g}")) for g in range(s.groups)]
                      for l in range(s.layers)]
        self.proj = [ProjBlock(s, weights.block(f"proj.{l}")) for l in range(s.layers)]
        self.ffn = [FfnBlock(s, weights.block(f"ffn.{l}")) for l in range(s.layers)] if not s.sharded else []
        # sharded: per layer its shards, whose partial outputs are summed in shard order
        self.shards = [[FfnBlock(s, weights.block(s.ffn_name(l, k))) for k in range(s.ffn_shards)]
                       for l in range(s.layers)] if s.sharded else []
        self.pos = 0

    def forward(self, tokens: list[int]) -> torch.Tensor:
        """Feed tokens at the current position; returns the [V] logits of the last one
        (the LM head runs on the last position only, as on the source device)."""
        x = self.source.embed(tokens, self.pos)
        for l in range(self.spec.layers):
            outs = {g: h.forward(x, self.pos) for g, h in enumerate(self.heads[l])}
            x = self.proj[l].forward(concat_heads(outs, self.spec.groups), x)
            x = self.ffn[l].forward(x) if not self.spec.sharded else x + sum_partials(
                [f.partial(x) for f in self.shards[l]])
        self.pos += len(tokens)
        return self.source.logits(x[-1:])[0]

    @torch.inference_mode()
    def generate(self, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
        """Prefill then greedy decode: the generated ids and their [new_tokens, V] logits
        (row i is the distribution that chose token i)."""
        if len(prompt) + new_tokens > self.spec.context:
            raise ValueError(f"prompt + new tokens exceed the context of {self.spec.context}")
        rows = [self.forward(prompt)]
        ids = [next_token(rows[-1])]
        while len(ids) < new_tokens:
            rows.append(self.forward([ids[-1]]))
            ids.append(next_token(rows[-1]))
        return ids, torch.stack(rows)


def next_token(logits: torch.Tensor) -> int:
    """Greedy decoding: the most likely token of a [V] row of logits. The reference, the
    controller and the source device's guess of the next attempt (computing early) all
    take it, so they agree."""
    return int(logits.argmax())


def random_prompt(spec: ModelSpec, seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(_seed_for(seed, "prompt"))
    return torch.randint(0, spec.vocab, (length,), generator=g).tolist()
