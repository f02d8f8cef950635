"""Bytes and FLOPs of every block, the source's fixed share, message sizes and the roofline
(a job's time from its FLOPs and the bytes it moves) (pure).

Owns the bytes-and-FLOPs arithmetic of the placeable blocks (head, proj, ffn); the
`tests/test_cost.py` check holds it to the live tensors (`nbytes` of weights and caches).
Notation: D d_model, d d_head, q query heads per K/V group, F d_ff, b bytes per element,
n the sequence length including the new token, p a prompt length.

Extensions of the design formulas, so that the numbers equal the real tensors:
- a head block also holds its copy of the pre-attention norm (2D values for LayerNorm,
  D for RMSNorm); an ffn block holds the pre-FFN norm;
- with grouped-query attention a head block holds q query slices and one K and one V
  slice, and its cache is one K/V pair per token;
- models without biases (Llama style) drop the bias terms, Qwen2 keeps those of Q/K/V only;
  SwiGLU has three matrices; an untied LM head is a second V x D matrix on the source;
- with `ffn_shards` N > 1 an ffn block is one shard: F/N hidden units (its FLOPs and
  matrices are 1/N of the FFN's), its own copy of the pre-FFN norm, and on shard 0 only the
  down bias (D values, GELU models). Priced by kind ("ffn") a shard is shard 0, the largest;
  `weight_bytes` of a `Block` is exact for every shard.
"""

from __future__ import annotations

import math
from functools import cache

from .spec import Block, ModelSpec

# Encoded size of a frame beyond its tensors' bytes, for the frames priced coarsely: the
# migration of a block (weights and cache in one frame of a few tensors). Activation frames
# are priced exactly by `hidden_bytes`, `output_bytes` and `head_output_bytes` below.
FRAME_OVERHEAD = 60

# A transport may add bytes to every frame beyond the encoded message: the in-process
# transport adds none, the websocket transport 13 (`transport.ws.FRAME_EXTRA`: a map entry
# with the time the frame was due, which keeps the map header at one byte for our messages of
# at most 6 fields). The activation frame sizes below take them as `extra`.

# Integer fields of activation frames (seq, pos) are priced as 16-bit msgpack integers
# (3 bytes): exact for 256..65535, at most 2 bytes over below (msgpack stores 0..127 in
# one byte and 128..255 in two), 2 bytes under from 65536 attempts or positions on.
_FIELD_INT = 3


def _norm_elems(spec: ModelSpec) -> int:
    return 2 * spec.d_model if spec.norm == "layernorm" else spec.d_model


@cache
def block_weight_elems(spec: ModelSpec, kind: str) -> int:
    D, d, q, F = spec.d_model, spec.d_head, spec.q_per_group, spec.d_ff
    bias = 1 if spec.attn_bias else 0
    if kind == "head":
        return _norm_elems(spec) + (q + 2) * (D * d + bias * d)
    if kind == "proj":
        return D * D + (D if spec.proj_bias else 0)
    if kind == "ffn":  # one shard (shard 0) when sharded
        F = spec.d_shard
        if spec.mlp == "swiglu":
            return _norm_elems(spec) + 3 * D * F
        return _norm_elems(spec) + 2 * D * F + F + D
    raise ValueError(f"unknown block kind {kind!r}")


def _down_bias(spec: ModelSpec) -> int:
    """Elements of the down projection's bias (on ffn shard 0 only)."""
    return 0 if spec.mlp == "swiglu" else spec.d_model


def weight_bytes(spec: ModelSpec, block: Block | str) -> int:
    """A block's weights; a kind alone is priced as its largest block (ffn: shard 0)."""
    if isinstance(block, str):
        return block_weight_elems(spec, block) * spec.bytes_per_elem
    elems = block_weight_elems(spec, block.kind)
    if block.kind == "ffn" and block.index > 0:
        elems -= _down_bias(spec)
    return elems * spec.bytes_per_elem


def cache_bytes(spec: ModelSpec, block: Block | str, n: int) -> int:
    """K/V cache of a head block holding n positions; 0 for proj and ffn."""
    kind = block if isinstance(block, str) else block.kind
    return 2 * n * spec.d_head * spec.bytes_per_elem if kind == "head" else 0


def cache_bytes_per_token(spec: ModelSpec) -> int:
    return 2 * spec.d_head * spec.bytes_per_elem


def block_bytes(spec: ModelSpec, block: Block | str, n: int) -> int:
    """Weights plus cache: what a device holds for the block, and what a migration moves."""
    return weight_bytes(spec, block) + cache_bytes(spec, block, n)


def decode_flops(spec: ModelSpec, block: Block | str, n: int) -> float:
    """FLOPs of one decode step for a block, the new token being position n (1-based)."""
    kind = block if isinstance(block, str) else block.kind
    D, d, q = spec.d_model, spec.d_head, spec.q_per_group
    if kind == "head":
        # Q/K/V projections (2*D*d each) + scores and weighted sum over n positions per query head
        return 2.0 * D * d * (q + 2) + 4.0 * n * d * q
    if kind == "proj":
        return 2.0 * D * D
    if kind == "ffn":  # one shard's when sharded
        return (6.0 if spec.mlp == "swiglu" else 4.0) * D * spec.d_shard
    raise ValueError(f"unknown block kind {kind!r}")


def prefill_flops(spec: ModelSpec, block: Block | str, p: int) -> float:
    """FLOPs of processing a p-token prompt: p decode steps' linear work plus the causal
    attention term sum_{i=1..p} 4*i*d*q."""
    kind = block if isinstance(block, str) else block.kind
    if kind == "head":
        D, d, q = spec.d_model, spec.d_head, spec.q_per_group
        return p * 2.0 * D * d * (q + 2) + 2.0 * p * (p + 1) * d * q
    return p * decode_flops(spec, kind, 1)


def span_flops(spec: ModelSpec, block: Block | str, pos: float, tokens: int) -> float:
    """FLOPs for `tokens` new positions pos .. pos+tokens-1 (0-based) in one job: a prefill
    chunk or (tokens = 1) a decode step. Position i attends over i + 1 keys."""
    kind = block if isinstance(block, str) else block.kind
    if kind == "head":
        D, d, q = spec.d_model, spec.d_head, spec.q_per_group
        return tokens * 2.0 * D * d * (q + 2) + 4.0 * d * q * (tokens * pos + tokens * (tokens + 1) / 2)
    return tokens * decode_flops(spec, kind, 1)


def span_bytes(spec: ModelSpec, block: Block | str, pos: float, tokens: int) -> float:
    """Bytes a job moves through memory for `tokens` new positions pos .. pos+tokens-1 (as
    `span_flops`): its weights read once, a head's K/V cache read over the pos + tokens
    positions it attends to and written for the `tokens` new ones, and the activations read
    and written (a head: x in, its q query heads' outputs out; proj: the concatenated head
    outputs and the residual in, D out; ffn: D in, D out). What a memory-bound device pays
    per job (`roofline_time`); prefill and decode alike."""
    kind = block if isinstance(block, str) else block.kind
    D, b = spec.d_model, spec.bytes_per_elem
    w = float(weight_bytes(spec, kind))
    if kind == "head":
        kv = cache_bytes_per_token(spec)
        return (w + kv * (pos + tokens) + kv * tokens
                + tokens * (D + spec.q_per_group * spec.d_head) * b)
    if kind == "proj":
        return w + tokens * 3 * D * b
    if kind == "ffn":
        return w + tokens * 2 * D * b
    raise ValueError(f"unknown block kind {kind!r}")


def source_bytes(spec: ModelSpec, tokens: int = 1) -> float:
    """Bytes the source's LM head moves for `tokens` positions: the V x D head matrix (the
    embedding when tied) and the final norm read, the hidden state in and the logits out."""
    head = spec.vocab * spec.d_model + _norm_elems(spec)
    return float((head + tokens * (spec.d_model + spec.vocab)) * spec.bytes_per_elem)


def roofline_time(flops: float, nbytes: float, rate: float, bandwidth: float = math.inf) -> float:
    """Seconds of a job of `flops` FLOPs moving `nbytes` bytes on a device of `rate` FLOP/s
    and `bandwidth` bytes/s of memory bandwidth: max(flops / rate, nbytes / bandwidth), the
    roofline. Without a bandwidth (inf) exactly flops / rate, the FLOP model. The one place
    both the emulated compute unit and the estimator (`placement.problem.LatencyModel`) take
    a job's time from."""
    t = flops / rate
    if bandwidth == math.inf:
        return t
    return max(t, nbytes / bandwidth)


def source_weight_bytes(spec: ModelSpec) -> int:
    """Embedding, LM head (untied: its own matrix), learned positions and the final norm:
    pinned to the source."""
    elems = spec.vocab * spec.d_model * (1 if spec.tied_head else 2) + _norm_elems(spec)
    if spec.positions == "learned":
        elems += spec.context * spec.d_model
    return elems * spec.bytes_per_elem


def source_flops(spec: ModelSpec, tokens: int = 1) -> float:
    """LM head (a D x V matrix-vector product) for `tokens` positions; the embedding lookup
    and the final norm are negligible."""
    return 2.0 * spec.d_model * spec.vocab * tokens


# ---------------------------------------------------------------------------- frames
# msgpack sizes of the data messages the device agents send (see agents/messages.py), as the
# codec encodes them: a map of short string keys, small integers, and tensors as maps
# {"dtype": str, "shape": [rows, cols], "data": bin}.


def _uint(v: int) -> int:
    """msgpack size of a non-negative integer."""
    return 1 if v < 128 else 2 if v < 1 << 8 else 3 if v < 1 << 16 else 5 if v < 1 << 32 else 9


def _str(nchars: int) -> int:
    return nchars + (1 if nchars < 32 else 2 if nchars < 1 << 8 else 3 if nchars < 1 << 16 else 5)


def _bin(nbytes: int) -> int:
    return nbytes + (2 if nbytes < 1 << 8 else 3 if nbytes < 1 << 16 else 5)


def _container(n: int) -> int:
    """Header of a msgpack array or map of n entries."""
    return 1 if n < 16 else 3 if n < 1 << 16 else 5


def _tensor_bytes(spec: ModelSpec, rows: int, cols: int) -> int:
    return (_container(3) + _str(5) + _str(len(spec.dtype)) + _str(5) + _container(2) + _uint(rows)
            + _uint(cols) + _str(4) + _bin(rows * cols * spec.bytes_per_elem))


def _fields(spec: ModelSpec, n_fields: int, with_layer: bool, extra: int) -> int:
    """The map header, `t` (a one-character type), `seq`, and `layer` and `pos` if present,
    plus what the transport adds."""
    size = _container(n_fields) + _str(1) + _str(1) + _str(3) + _FIELD_INT + extra
    if with_layer:
        size += _str(5) + _uint(max(0, spec.layers - 1)) + _str(3) + _FIELD_INT
    return size


def hidden_bytes(spec: ModelSpec, tokens: int = 1, extra: int = 0) -> int:
    """Frame carrying the hidden state of `tokens` positions into a layer (`x`, from
    upstream to the layer's head and proj devices) or from proj to ffn (`y`): {t, seq,
    layer, pos, x[T, D]}, plus `extra` bytes the transport adds."""
    return _fields(spec, 5, True, extra) + _str(1) + _tensor_bytes(spec, tokens, spec.d_model)


def output_bytes(spec: ModelSpec, tokens: int = 1, extra: int = 0) -> int:
    """Frame carrying the last layer's hidden state back to the source (`z`): {t, seq,
    x[T, D]}, plus `extra` bytes the transport adds."""
    return _fields(spec, 3, False, extra) + _str(1) + _tensor_bytes(spec, tokens, spec.d_model)


def head_output_frame(spec: ModelSpec, tokens: int = 1, extra: int = 0) -> tuple[int, int]:
    """(per_group, base): the frame carrying the outputs of k head blocks of one layer from
    one device (`h`: {t, seq, layer, pos, groups[k], out[T, k q d]}) takes at most
    `base + k per_group` bytes. Affine in k, as the exact solver needs: each group adds its
    output values and its index in `groups`; the headers that grow with k (the list's,
    the column count's, the data's length) are priced at k = G, so the size is exact for a
    device holding every group of a layer and at most 9 bytes over for fewer (plus one per
    group below index 128 when G > 128). `extra`: bytes the transport adds (in `base`)."""
    G = spec.groups
    w = tokens * spec.q_per_group * spec.d_head * spec.bytes_per_elem
    per_group = w + _uint(max(0, G - 1))
    full = (_fields(spec, 6, True, extra) + _str(6) + _container(G) + G * _uint(max(0, G - 1)) + _str(3)
            + _tensor_bytes(spec, tokens, G * spec.q_per_group * spec.d_head))
    return per_group, full - G * per_group


def head_output_bytes(spec: ModelSpec, groups: int, tokens: int = 1, extra: int = 0) -> int:
    """Frame carrying the outputs of `groups` head blocks of one layer from one device
    (see `head_output_frame`)."""
    per_group, base = head_output_frame(spec, tokens, extra)
    return base + groups * per_group


def partial_bytes(spec: ModelSpec, shards: int, tokens: int = 1, extra: int = 0) -> int:
    """Frame carrying the summed partial outputs of `shards` ffn shards of one layer from
    one device to the layer's shard 0 (`f`: {t, seq, layer, pos, shards[k], x[T, D]}), plus
    `extra` bytes the transport adds. Shard indices are priced at N - 1 (exact, or up to
    one byte per index over)."""
    N = spec.ffn_shards
    return (_fields(spec, 6, True, extra) + _str(6) + _container(shards) + shards * _uint(max(0, N - 1))
            + _str(1) + _tensor_bytes(spec, tokens, spec.d_model))


def ffn_layer_weight_bytes(spec: ModelSpec) -> int:
    """Weights of one layer's whole FFN: every shard (each with its norm copy)."""
    N = spec.ffn_shards
    return N * weight_bytes(spec, "ffn") - (N - 1) * _down_bias(spec) * spec.bytes_per_elem


def model_weight_bytes(spec: ModelSpec) -> int:
    """All placeable blocks' weights (not the source's share)."""
    L, G = spec.layers, spec.groups
    return L * (G * weight_bytes(spec, "head") + weight_bytes(spec, "proj") + ffn_layer_weight_bytes(spec))


def model_cache_bytes(spec: ModelSpec, n: int) -> int:
    return spec.layers * spec.groups * cache_bytes(spec, "head", n)
