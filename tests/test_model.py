"""The model blocks: caches, prefill versus token-by-token decoding, rope, the reference."""

from __future__ import annotations

import pytest
import torch

from testbed.model.blocks import HeadBlock, KVCache, RandomWeights, Reference, random_prompt, rope
from testbed.model.spec import Block, ModelSpec, from_name

GQA = ModelSpec("gqa-test", layers=2, heads=8, d_model=64, vocab=128, kv_heads=2, norm="rmsnorm",
                mlp="swiglu", positions="rope", attn_bias=False)


def test_cache_grows_overwrites_and_counts_live_rows() -> None:
    c = KVCache(4, torch.float32, capacity=2)
    c.write(0, torch.ones(3, 4), torch.ones(3, 4))
    assert c.n == 3 and c.nbytes == 2 * 3 * 4 * 4
    c.write(1, torch.full((1, 4), 7.0), torch.zeros(1, 4))  # a retried position overwrites
    assert c.n == 3 and c.k[1, 0] == 7.0
    with pytest.raises(ValueError):
        c.write(5, torch.ones(1, 4), torch.ones(1, 4))
    d = KVCache.from_state(c.k, c.v)
    assert torch.equal(d.k, c.k) and d.n == 3


@pytest.mark.parametrize("spec", [from_name("gpt-tiny"), GQA], ids=lambda s: s.name)
def test_prefill_equals_token_by_token(spec: ModelSpec) -> None:
    w = RandomWeights(spec, 2).block("head.1.1")
    a, b = HeadBlock.create(spec, w), HeadBlock.create(spec, w)
    x = torch.randn(7, spec.d_model)
    full = a.forward(x, 0)
    step = torch.cat([b.forward(x[i:i + 1], i) for i in range(7)])
    assert torch.allclose(full, step, atol=1e-5)
    assert torch.allclose(a.cache.k, b.cache.k, atol=1e-6) and torch.allclose(a.cache.v, b.cache.v, atol=1e-6)


def test_rope_rotates_pairs_and_keeps_norms() -> None:
    x = torch.randn(5, 3, 8)
    y = rope(x, 10, 10000.0)
    assert torch.allclose(x.norm(dim=-1), y.norm(dim=-1), atol=1e-5)
    assert torch.allclose(rope(x[:1], 0, 10000.0), x[:1])  # position 0 is the identity


def _rope_per_call(x: torch.Tensor, pos0: int, base: float, freqs: tuple[float, ...] = ()) -> torch.Tensor:
    """The rotary embedding computed from the call's own positions (its formula written out)."""
    T, _, d = x.shape
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    if freqs:
        inv = inv / torch.tensor(freqs, dtype=torch.float32)
    ang = torch.arange(pos0, pos0 + T, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


@pytest.mark.parametrize("d", [2, 6, 8, 16, 64, 128])
def test_rope_from_the_shared_table_equals_the_per_call_formula_bit_for_bit(d: int) -> None:
    # the tables are built once per process; the runs' tokens and logits must not move
    g = torch.Generator().manual_seed(d)
    freqs = tuple(1.0 + i / 7 for i in range(d // 2))
    for pos0, T in ((0, 1), (5, 1), (3, 7), (255, 1), (255, 2), (1000, 3), (4095, 1), (8190, 2)):
        x = torch.randn(T, 3, d, generator=g)
        for f in ((), freqs):
            assert torch.equal(rope(x, pos0, 10000.0, f), _rope_per_call(x, pos0, 10000.0, f)), (d, pos0, T, f)
        for dtype in (torch.bfloat16, torch.float16):  # rotated in float32, then cast back
            xh = (8 * x).to(dtype)
            want = _rope_per_call(xh.float(), pos0, 10000.0, freqs).to(dtype)
            assert torch.equal(rope(xh, pos0, 10000.0, freqs), want), (d, pos0, T, dtype)


def test_reference_is_deterministic_and_bounded_by_context() -> None:
    spec = from_name("gpt-tiny")
    p = random_prompt(spec, 3, 6)
    ids1, l1 = Reference(RandomWeights(spec, 3)).generate(p, 8)
    ids2, l2 = Reference(RandomWeights(spec, 3)).generate(p, 8)
    assert ids1 == ids2 and torch.equal(l1, l2) and l1.shape == (8, spec.vocab)
    assert len(set(ids1)) > 1  # random weights still give varied tokens
    assert ids1 != Reference(RandomWeights(spec, 4)).generate(p, 8)[0]
    small = spec.with_overrides(context=10)
    with pytest.raises(ValueError):
        Reference(RandomWeights(small, 3)).generate(p, 5)


def test_block_names_round_trip() -> None:
    spec = from_name("gpt-mini")
    assert len(spec.blocks) == spec.layers * (spec.heads + 2)
    for b in spec.blocks:
        assert Block.parse(b.name) == b
    for bad in ("head.1", "ffn", "proj.x", "attn.0"):
        with pytest.raises(ValueError):
            Block.parse(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [2, 6, 8, 16, 64, 96, 576, 960, 2048])
def test_rmsnorm_in_one_call_equals_the_formula_bit_for_bit(D: int, dtype: torch.dtype) -> None:
    """The blocks' RMSNorm is one fused call (`F.rms_norm`); the runs' tokens and logits
    must not move: it equals x * rsqrt(mean(x^2) + eps) * w, computed in float32."""
    from testbed.model.blocks import _norm

    spec = from_name("smollm2-135m")
    g = torch.Generator().manual_seed(D)
    for T in (1, 3, 17):
        x = (4 * torch.randn(T, D, generator=g)).to(dtype)
        w = {"norm.w": torch.randn(D, generator=g).to(dtype)}
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + spec.norm_eps)
        assert torch.equal(_norm(x, w, spec), y.to(dtype) * w["norm.w"]), (D, dtype, T)
