"""The tokenizer of a GGUF file, built with the `tokenizers` library from the file's own
vocabulary, merges (or scores) and special tokens.

Owns `GGUFTokenizer`, `load_tokenizer(path)` and `pretokenize`. Does not own the file
(gguf_file.py). Nothing here downloads.

Why `tokenizers`: it is the Hugging Face implementation of exactly these models (BPE with
merge ranks, byte-level and byte-fallback variants, regex pre-tokenizers with Unicode
classes), maintained and fast; what is left to us is to say, per file, which pieces to put
together, as llama.cpp does from `tokenizer.ggml.model` and `tokenizer.ggml.pre`:
- model `gpt2` (byte-level BPE with merges): pre-tokenizer `smollm` (each digit alone, then
  GPT-2's split; SmolLM2), `llama-bpe`/`llama3` (Llama 3's split: up to 3 digits, case-
  insensitive contractions), `qwen2` (Qwen2's: single digits), `gpt2`/`default` (GPT-2's);
- model `llama` (SentencePiece BPE with scores and byte fallback: TinyLlama, Llama 2): a
  "▁" before the text and after every special token, spaces as "▁", merges recovered from
  the scores (a token splits into two vocabulary pieces; the merge's rank is the token's
  score), bytes without a piece as `<0xXX>` tokens.
Control and user-defined tokens (`<|im_start|>`, `<s>`, ...) are matched whole in the text,
as llama.cpp and Hugging Face do.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from .gguf_file import GGUFError, open_gguf

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), as the models' tokenizer.json spell them
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_PRE = ("smollm", "llama-bpe", "llama3", "qwen2", "gpt2", "default")
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values matched verbatim


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what byte-level tokens spell)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _pre_tokenizer(pre: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default"):
        return byte_level
    split = LLAMA3_SPLIT if pre in ("llama-bpe", "llama3") else QWEN2_SPLIT
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def spm_merges(tokens: list[str], scores: list[float], normal: set[int]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece BPE vocabulary: every split of a normal token into
    two vocabulary pieces, best-scored token first (ties: by the pieces' ids)."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for i in normal:
        t = tokens[i]
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in ids and b in ids:
                found.append((-scores[i], ids[a], ids[b], a, b))
    found.sort()
    return [(a, b) for *_, a, b in found]


class GGUFTokenizer:
    """encode/decode with a GGUF file's vocabulary (see the module doc for the kinds)."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

        g = open_gguf(path)
        self.model = g.field("tokenizer.ggml.model")
        self.pre = g.field("tokenizer.ggml.pre", "default")
        self.tokens = g.strings("tokenizer.ggml.tokens")
        n = len(self.tokens)
        self.token_types = g.numbers("tokenizer.ggml.token_type") if g.has("tokenizer.ggml.token_type") else [1] * n
        self.bos_id = g.field("tokenizer.ggml.bos_token_id")
        self.eos_id = g.field("tokenizer.ggml.eos_token_id")
        self.unk_id = g.field("tokenizer.ggml.unknown_token_id")
        self.chat_template = g.field("tokenizer.chat_template")
        vocab = {t: i for i, t in enumerate(self.tokens)}
        if self.model == "gpt2":
            if self.pre not in BPE_PRE:
                raise GGUFError(g.path, f"tokenizer.ggml.pre: {self.pre!r} is not supported "
                                f"(supported: {', '.join(BPE_PRE)})")
            merges = [(a, b) for a, _, b in (m.partition(" ") for m in g.strings("tokenizer.ggml.merges"))]
            unk = self.tokens[self.unk_id] if self.unk_id is not None else None
            tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=False))
            tok.pre_tokenizer = _pre_tokenizer(self.pre)
            tok.decoder = decoders.ByteLevel()
            add_bos_default = False
        elif self.model == "llama":
            scores = g.numbers("tokenizer.ggml.scores")
            normal = {i for i, t in enumerate(self.token_types) if t == 1}
            unk = self.tokens[self.unk_id if self.unk_id is not None else 0]
            tok = Tokenizer(models.BPE(vocab, spm_merges(self.tokens, scores, normal), unk_token=unk,
                                       fuse_unk=True, byte_fallback=True))
            if g.field("tokenizer.ggml.add_space_prefix", True):
                tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
                tail = [decoders.Strip(" ", 1, 0)]
            else:
                tok.normalizer = normalizers.Replace(" ", "▁")
                tail = []
            tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), *tail])
            add_bos_default = True
        else:
            raise GGUFError(g.path, f"tokenizer.ggml.model: {self.model!r} is not supported "
                            "(gpt2: byte-level BPE; llama: SentencePiece BPE)")
        self.add_bos = bool(g.field("tokenizer.ggml.add_bos_token", add_bos_default))
        self.special_ids = {i for i, t in enumerate(self.token_types) if t in (CONTROL, USER_DEFINED)}
        tok.add_special_tokens([AddedToken(self.tokens[i], special=True, normalized=False)
                                for i in sorted(self.special_ids)])
        self._tok = tok
        self._no_special = Tokenizer.from_str(tok.to_str())
        self._no_special.encode_special_tokens = True
        u2b = {u: b for b, u in _bytes_to_unicode().items()}
        # Bytes a byte-level vocabulary has no token for (SmolLM2 lacks a few control
        # characters and rare 4-byte leads): when no merge absorbs one it becomes the
        # unknown token (llama.cpp would refuse the text).
        self.missing_bytes = sorted(b for b, u in _bytes_to_unicode().items() if u not in vocab
                                    and b not in {0xC0, 0xC1, *range(0xF5, 0x100)}) if self.model == "gpt2" else []
        self._u2b = u2b

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, *, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of `text`; `special` matches control tokens written in the text."""
        ids = (self._tok if special else self._no_special).encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], *, skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def pretokenize(self, text: str) -> list[str]:
        """The pieces BPE runs on, as text (byte-level pieces mapped back to their bytes)."""
        if self._tok.pre_tokenizer is None:
            return [text]
        pieces = [p for p, _ in self._tok.pre_tokenizer.pre_tokenize_str(text)]
        if self.model != "gpt2":
            return pieces
        return [bytes(self._u2b[c] for c in p).decode("utf-8", errors="replace") for p in pieces]


@functools.lru_cache(maxsize=4)
def _load(path: str) -> GGUFTokenizer:
    return GGUFTokenizer(path)


def load_tokenizer(path: str | Path) -> GGUFTokenizer:
    """The tokenizer of a GGUF file, built once per process."""
    return _load(str(path))
