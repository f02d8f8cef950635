"""The cost model agrees with the live tensors: weights and caches, several presets and
sequence lengths; frame sizes agree with the real codec."""

from __future__ import annotations

import pytest
import torch

from testbed.model import cost
from testbed.model.blocks import HeadBlock, RandomWeights
from testbed.model.spec import ModelSpec, from_name
from testbed.transport.codec import encode

GQA = ModelSpec("gqa-test", layers=2, heads=8, d_model=64, vocab=128, kv_heads=2, norm="rmsnorm",
                mlp="swiglu", positions="rope", attn_bias=False)
# Qwen2-like: biases on Q/K/V but not on W_o, and an untied LM head (a second V x D matrix)
QWEN = ModelSpec("qwen-test", layers=2, heads=8, d_model=64, vocab=128, kv_heads=2, norm="rmsnorm",
                 mlp="swiglu", positions="rope", attn_bias=True, proj_bias=False, tied_head=False)
SPECS = [from_name("gpt-tiny"), from_name("gpt-mini"), from_name("gpt2-small"), from_name("paper-small"),
         GQA, QWEN, from_name("gpt-mini").with_overrides(dtype="float16")]


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.nbytes for t in tensors.values())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-{s.dtype}")
def test_weight_bytes_equal_live_tensors(spec: ModelSpec) -> None:
    w = RandomWeights(spec, seed=3)
    last = spec.layers - 1
    for name, kind in (("head.0.0", "head"), (f"head.{last}.{spec.groups - 1}", "head"),
                       (f"proj.{last}", "proj"), ("ffn.0", "ffn")):
        assert cost.weight_bytes(spec, kind) == nbytes(w.block(name)), name
    assert cost.source_weight_bytes(spec) == nbytes(w.source())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-{s.dtype}")
@pytest.mark.parametrize("n", [1, 7, 33, 100])
def test_cache_bytes_equal_live_cache(spec: ModelSpec, n: int) -> None:
    head = HeadBlock.create(spec, RandomWeights(spec, seed=1).block("head.0.0"))
    x = torch.randn(n, spec.d_model).to(head.w["wqkv"].dtype)
    head.forward(x[: n // 2 + 1], 0)  # a prefill chunk, then single tokens
    for pos in range(n // 2 + 1, n):
        head.forward(x[pos:pos + 1], pos)
    assert head.cache.n == n
    assert cost.cache_bytes(spec, "head", n) == head.cache.nbytes
    assert cost.block_bytes(spec, "head", n) == nbytes(head.w) + head.cache.nbytes


def test_model_totals_add_up() -> None:
    spec = from_name("gpt-mini")
    w = RandomWeights(spec, 0)
    assert cost.model_weight_bytes(spec) == sum(nbytes(w.block(b.name)) for b in spec.blocks)
    assert cost.model_cache_bytes(spec, 10) == spec.layers * spec.groups * cost.cache_bytes(spec, "head", 10)


def test_flops_follow_the_design_formulas() -> None:
    s = from_name("gpt-mini")
    D, d, F = s.d_model, s.d_head, s.d_ff
    assert cost.decode_flops(s, "head", 9) == 6 * D * d + 4 * 9 * d
    assert cost.decode_flops(s, "proj", 9) == 2 * D * D
    assert cost.decode_flops(s, "ffn", 9) == 4 * D * F
    # a prefill of p tokens = p decode steps at lengths 1..p
    assert cost.prefill_flops(s, "head", 12) == sum(cost.decode_flops(s, "head", n) for n in range(1, 13))
    assert cost.span_flops(s, "head", 5, 3) == sum(cost.decode_flops(s, "head", n) for n in (6, 7, 8))


@pytest.mark.parametrize("spec", [from_name("gpt-mini"), from_name("gpt2-small"), GQA], ids=lambda s: s.name)
def test_frame_sizes_match_the_codec(spec: ModelSpec) -> None:
    """The estimator's message sizes are within a few bytes of the real encoded frames."""
    dt = torch.float32
    x = {"t": "x", "seq": 123456, "layer": spec.layers - 1, "pos": 2047, "x": torch.zeros(1, spec.d_model, dtype=dt)}
    assert abs(len(encode(x)) - cost.hidden_bytes(spec)) <= 48
    k = 3 if spec.groups >= 3 else 1
    w = spec.q_per_group * spec.d_head
    h = {"t": "h", "seq": 123456, "layer": spec.layers - 1, "pos": 2047, "groups": list(range(k)),
         "out": torch.zeros(1, k * w, dtype=dt)}
    assert abs(len(encode(h)) - cost.head_output_bytes(spec, k)) <= 48
