"""Small llama-family GGUF files with random weights, written with the `gguf` library, so that
the GGUF path can be tested without downloading a model.

Owns `Synth` (what to write: architecture, tokenizer kind, tensor type, sizes) and
`write_gguf`. The files carry what llama.cpp's converter writes for such a model: the
metadata keys, the tensor names and shapes, F32 norms (and biases, and `rope_freqs`), the
2-D weights in the chosen type, and a tokenizer (a byte-level BPE vocabulary with merges,
or a SentencePiece one with scores and byte tokens) learned from a short text by the
`tokenizers` trainer. The weights are random, so the Q/K row layout only has to be the one
each architecture's readers expect, which they then undo identically or not at all.

Types the gguf library can quantise (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) are
written from Gaussian weights; the k-quants it can only read (Q2_K .. Q6_K) are written as
random packed blocks whose scale fields are set to give the same spread.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

WRITABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
READ_ONLY = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# k-quant block layout: (byte offset of the f16 scale d, of the f16 min scale dmin or None,
# dmin / d that centres the values on zero)
K_SCALES = {"Q2_K": (80, 82, 1.5), "Q3_K": (108, None, 0.0), "Q4_K": (0, 2, 7.5),
            "Q5_K": (0, 2, 15.5), "Q6_K": (208, None, 0.0)}
# Llama 3.x long-context RoPE (the converter turns these into the rope_freqs tensor)
LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome, and the capital of Spain is Madrid.",
    "Hello, world! It's 2024 and I've got 3.14159 apples; we'll see what they're doing at 10:30pm.",
    "The quick brown fox jumps over the lazy dog. A partitioned model runs its heads on many devices.",
    "Edge devices share the attention heads of a language model over a network with links that drop.",
    "naïve café – “quotes” 日本語 e-mail@example.com  two  spaces,\ttabs,\n\nand blank lines\n",
]


@dataclass(frozen=True)
class Synth:
    arch: str = "llama"  # llama | qwen2
    tokenizer: str = "smollm"  # smollm | llama-bpe | qwen2 | spm (SentencePiece, TinyLlama-like)
    qtype: str = "F32"  # the 2-D weights' type (embedding and LM head included)
    layers: int = 2
    d_model: int = 256
    heads: int = 4
    kv_heads: int = 2
    d_ff: int = 512
    vocab: int = 400  # tokens (the byte-level alphabet or byte tokens, specials, learned pieces)
    pad_vocab: int = 0  # then unused tokens up to this many (a real-sized embedding)
    context: int = 2048
    tied: bool = True
    llama3_rope: bool = False  # write rope_freqs as Llama 3.x files do
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    seed: int = 0

    @property
    def d_head(self) -> int:
        return self.d_model // self.heads


def llama3_rope_freqs(d_head: int, base: float, p: dict[str, float] = LLAMA3_ROPE) -> list[float]:
    """The factors llama.cpp's converter writes for Llama 3.x RoPE scaling (one per pair)."""
    freqs = [1.0 / base ** (i / d_head) for i in range(0, d_head, 2)]
    low = p["original_max_position_embeddings"] / p["low_freq_factor"]
    high = p["original_max_position_embeddings"] / p["high_freq_factor"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high:
            out.append(1.0)
        elif wavelen > low:
            out.append(p["factor"])
        else:
            smooth = (p["original_max_position_embeddings"] / wavelen - p["low_freq_factor"]) / (
                p["high_freq_factor"] - p["low_freq_factor"])
            out.append(1.0 / ((1 - smooth) / p["factor"] + smooth))
    return out


# ---------------------------------------------------------------------------- tokenizers


def _train_byte_level(pre: str, size: int, specials: list[str]) -> tuple[list[str], list[str]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from .tokenizer import _pre_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(pre)
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return [t for t, _ in vocab], merges


def _train_spm(size: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-BPE-style vocabulary: <unk>, <s>, </s>, 256 byte tokens, then pieces
    (characters and merges, "▁" for spaces) scored so that earlier merges rank first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=size - 259, show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    model = json.loads(tok.to_str())["model"]
    merged = ["".join(m) if not isinstance(m, str) else m.replace(" ", "") for m in model["merges"]]
    chars = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if len(t) == 1]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for rank, t in enumerate(merged):  # a merge's result: best score for the first merge
        if t not in tokens:
            tokens.append(t)
            types.append(1)
            scores.append(-float(rank))
    for i, c in enumerate(chars):
        if c not in tokens:
            tokens.append(c)
            types.append(1)
            scores.append(-float(len(merged) + i))
    return tokens, scores, types


def _pad(tokens: list[str], types: list[int], n: int) -> None:
    while len(tokens) < n:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(5)  # UNUSED


def _add_tokenizer(w: Any, s: Synth) -> int:
    """Write the tokenizer metadata; returns the vocabulary size."""
    if s.tokenizer == "spm":
        tokens, scores, types = _train_spm(s.vocab)
        _pad(tokens, types, s.pad_vocab)
        scores += [-1e9] * (len(tokens) - len(scores))
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)
        return len(tokens)
    if s.tokenizer == "llama-bpe":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
        bos, eos, add_bos = 0, 1, True
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        bos, eos, add_bos = (1, 2, False) if s.tokenizer == "smollm" else (0, 0, False)
    tokens, merges = _train_byte_level(s.tokenizer, s.vocab, specials)
    types = [3 if t in specials else 1 for t in tokens]
    _pad(tokens, types, s.pad_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(s.tokenizer)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    if s.tokenizer == "smollm":
        w.add_unk_token_id(0)
    w.add_add_bos_token(add_bos)
    return len(tokens)


# ---------------------------------------------------------------------------- tensors


def _k_blocks(rows: int, cols: int, qtype: str, std: float, rng: np.random.Generator) -> np.ndarray:
    """Random packed k-quant blocks with values of about the given spread."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    t = GGMLQuantizationType[qtype]
    block, size = GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    d_at, m_at, ratio = K_SCALES[qtype]

    def set_scales(d: float) -> None:
        raw[:, d_at:d_at + 2] = np.frombuffer(np.float16(d).tobytes(), dtype=np.uint8)
        if m_at is not None:
            raw[:, m_at:m_at + 2] = np.frombuffer(np.float16(d * ratio).tobytes(), dtype=np.uint8)

    set_scales(1.0)
    spread = float(dequantize(raw[: min(len(raw), 64)], t).std()) or 1.0
    set_scales(std / spread)
    return raw.reshape(rows, cols // block * size)


def _tensor(w: Any, name: str, rows: int, cols: int, qtype: str, std: float,
            rng: np.random.Generator, mean: float = 0.0) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if qtype in K_SCALES:
        w.add_tensor(name, _k_blocks(rows, cols, qtype, std, rng), raw_dtype=GGMLQuantizationType[qtype])
        return
    a = (rng.standard_normal((rows, cols), dtype=np.float32) * std + mean).astype(np.float32)
    if qtype == "F32":
        w.add_tensor(name, a)
    elif qtype == "F16":
        w.add_tensor(name, a.astype(np.float16))
    else:
        t = GGMLQuantizationType[qtype]
        w.add_tensor(name, quantize(a, t), raw_dtype=t)


def write_gguf(path: str | Path, s: Synth) -> Path:
    """Write the file described by `s` (deterministic for its seed); returns the path."""
    import gguf

    path = Path(path)
    rng = np.random.default_rng(s.seed)
    w = gguf.GGUFWriter(str(path), s.arch)
    w.add_name(f"synthetic-{s.arch}-{s.tokenizer}-{s.qtype}")
    D, d, F = s.d_model, s.d_head, s.d_ff
    w.add_context_length(s.context)
    w.add_embedding_length(D)
    w.add_block_count(s.layers)
    w.add_feed_forward_length(F)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_layer_norm_rms_eps(s.norm_eps)
    w.add_rope_freq_base(s.rope_base)
    if s.arch == "llama":
        w.add_rope_dimension_count(d)
    vocab = _add_tokenizer(w, s)
    if s.arch == "llama":
        w.add_vocab_size(vocab)

    def vec(name: str, n: int, std: float, mean: float = 0.0) -> None:
        w.add_tensor(name, (rng.standard_normal(n, dtype=np.float32) * std + mean).astype(np.float32))

    _tensor(w, "token_embd.weight", vocab, D, s.qtype, 0.1, rng)
    for layer in range(s.layers):
        p = f"blk.{layer}."
        vec(p + "attn_norm.weight", D, 0.1, 1.0)
        _tensor(w, p + "attn_q.weight", s.heads * d, D, s.qtype, 2 / math.sqrt(D), rng)
        _tensor(w, p + "attn_k.weight", s.kv_heads * d, D, s.qtype, 2 / math.sqrt(D), rng)
        _tensor(w, p + "attn_v.weight", s.kv_heads * d, D, s.qtype, 2 / math.sqrt(D), rng)
        if s.arch == "qwen2":
            vec(p + "attn_q.bias", s.heads * d, 0.1)
            vec(p + "attn_k.bias", s.kv_heads * d, 0.1)
            vec(p + "attn_v.bias", s.kv_heads * d, 0.1)
        _tensor(w, p + "attn_output.weight", D, s.heads * d, s.qtype, 2 / math.sqrt(D), rng)
        vec(p + "ffn_norm.weight", D, 0.1, 1.0)
        _tensor(w, p + "ffn_gate.weight", F, D, s.qtype, 2 / math.sqrt(D), rng)
        _tensor(w, p + "ffn_up.weight", F, D, s.qtype, 2 / math.sqrt(D), rng)
        _tensor(w, p + "ffn_down.weight", D, F, s.qtype, 2 / math.sqrt(F), rng)
    vec("output_norm.weight", D, 0.1, 1.0)
    if not s.tied:
        _tensor(w, "output.weight", vocab, D, s.qtype, 2 / math.sqrt(D), rng)
    if s.llama3_rope:
        w.add_tensor("rope_freqs.weight", np.array(llama3_rope_freqs(d, s.rope_base), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
