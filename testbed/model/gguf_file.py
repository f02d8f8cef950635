"""A llama-family GGUF file: its metadata as a `ModelSpec`, its tensors dequantised by rows.

Owns: `GGUFError` (one line that names the file), `open_gguf` (the file, once
gguf_header.py has checked its header, through the `gguf` library's reader: memory-mapped,
nothing is read until asked), `spec_from_gguf`, the checks
that the tensors are the ones a llama-family model needs, with the shapes its metadata
implies, and `iter_rows` (dequantise a row range, a chunk at a time, then let the kernel
drop the mapped pages again). Pure: numpy and gguf, no torch, no asyncio.

Supported: `general.architecture` llama (SmolLM2, TinyLlama, Llama 2/3.x; Q/K rows as
llama.cpp's converter permutes them, i.e. rotary pairs interleaved; Llama 3's long-context
scaling as the `rope_freqs` tensor; linear RoPE scaling from the metadata) and qwen2 (biases
on Q/K/V; Q/K rows in the Hugging Face order, rotated by halves, which `GGUFWeights`
re-orders into interleaved pairs). Tensor types in `TYPES`, dequantised by the gguf library.
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import math
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .gguf_header import HeaderError, check_file
from .spec import ModelSpec

ARCHS = ("llama", "qwen2")
# the types llama-family files commonly use; the gguf library dequantises all of them (and
# can write F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; the k-quants are read-only there)
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
         "Q5_K", "Q6_K")
CHUNK_ELEMS = 1 << 22  # dequantise at most this many values at a time (16 MiB as float32)
GGUF_HINT = "pip install 'gguf>=0.17.1' (the smollm2 extra)"


class GGUFError(ValueError):
    """A GGUF file this testbed cannot run. `str()` is one line: `FILE: what`."""

    def __init__(self, path: str | os.PathLike, message: str) -> None:
        self.file, self.message = os.fspath(path), message
        super().__init__(f"{self.file}: {message}")


class ReaderMissing(RuntimeError):
    """The `gguf` package is not installed."""


def require_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ReaderMissing(f"the 'gguf' reader is not installed; run: {GGUF_HINT}")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # GGML type name, e.g. Q4_K
    shape: tuple[int, ...]  # numpy order: [rows, cols] for a matrix, [n] for a vector
    offset: int  # of its data in the file
    nbytes: int


class GGUFFile:
    """A parsed GGUF file: metadata as Python values, tensor infos, and rows on demand."""

    def __init__(self, path: str | os.PathLike) -> None:
        require_reader()
        import gguf

        self.path = Path(path)
        try:  # the reader trusts the header: it is checked first (gguf_header.py)
            header = check_file(self.path)
        except HeaderError as e:
            raise GGUFError(path, str(e)) from None
        try:
            self.reader = _reader_class(gguf)(str(self.path))
        except Exception as e:  # what the walk does not model: the reader fails in many ways
            raise GGUFError(path, f"broken GGUF file ({type(e).__name__}: {' '.join(str(e).split())})") from None
        if (len(self.reader.data), int(self.reader.data_offset)) != (header.size, header.data_offset):
            raise GGUFError(path, "the file changed while it was being read")
        self.tensors: dict[str, TensorInfo] = {}
        self.spec: ModelSpec | None = None  # set by spec_from_gguf, once
        self._data: dict[str, Any] = {}
        for t in self.reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            self.tensors[t.name] = TensorInfo(t.name, t.tensor_type.name, shape, int(t.data_offset),
                                              int(t.n_bytes))
            self._data[t.name] = t

    # ------------------------------------------------------------------ metadata

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def strings(self, key: str) -> list[str]:
        """A string array, decoded straight from the field parts (much faster than contents())."""
        f = self.reader.fields[key]
        return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]

    def numbers(self, key: str) -> list[Any]:
        f = self.reader.fields[key]
        return [f.parts[i][0].item() for i in f.data]

    def count(self, key: str) -> int:
        """Length of an array field (0 when absent)."""
        f = self.reader.fields.get(key)
        return 0 if f is None else len(f.data)

    # ------------------------------------------------------------------ tensors

    def iter_rows(self, name: str, start: int = 0, stop: int | None = None,
                  chunk_elems: int | None = None) -> Iterator[tuple[int, Any]]:
        """(first row, float32 array [n, cols]) for rows start..stop-1 of a tensor, in chunks
        of about `chunk_elems` (default CHUNK_ELEMS) values (a vector is one row). Each chunk is a fresh array, or
        for F32 a view of the mapped file. After the last chunk the mapped pages of the range
        are handed back to the kernel, so reading a tensor leaves no file pages resident."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self._data[name]
        info = self.tensors[name]
        cols = info.shape[-1]
        rows = math.prod(info.shape[:-1])
        stop = rows if stop is None else stop
        if not 0 <= start <= stop <= rows:
            raise IndexError(f"{name}: rows {start}..{stop} of {rows}")
        data = t.data.reshape(rows, -1)  # one row of values, or of bytes for packed types
        qtype = GGMLQuantizationType[info.type]
        step = max(1, (chunk_elems or CHUNK_ELEMS) // cols)
        try:
            for r in range(start, stop, step):
                chunk = dequantize(data[r:min(r + step, stop)], qtype)
                yield r, chunk.reshape(-1, cols)
        finally:
            self._release(info.offset + start * info.nbytes // rows, info.offset + stop * info.nbytes // rows)

    def _release(self, begin: int, end: int) -> None:
        """madvise(DONTNEED) the mapped bytes begin..end: clean file pages, read again if needed."""
        m = getattr(getattr(self.reader, "memmap", None), "_mmap", None)
        if m is None or not hasattr(m, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        lo = begin // page * page
        hi = min(len(m), -(-end // page) * page)
        if hi > lo:
            try:
                m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            except (OSError, ValueError):
                pass

    def array(self, name: str) -> Any:
        """A whole (small) tensor as float32 numpy, numpy-shaped."""
        import numpy as np

        parts = [chunk for _, chunk in self.iter_rows(name)]
        return np.concatenate(parts).reshape(self.tensors[name].shape)


@functools.cache
def _reader_class(gguf: Any) -> type:
    """gguf.GGUFReader over a plain ndarray view of its memory map. The reader slices its
    `data` once or twice per metadata value, and numpy's memmap subclass makes each slice
    cost microseconds: SmolLM2's 49k tokens and 48k merges open in 1 s instead of 5."""
    import numpy as np

    class Reader(gguf.GGUFReader):
        @property
        def data(self) -> Any:
            return self._plain

        @data.setter
        def data(self, value: Any) -> None:
            self.memmap = value  # kept for madvise
            self._plain = value.view(np.ndarray)

    return Reader


@functools.lru_cache(maxsize=8)
def _open(path: str, size: int, mtime_ns: int) -> GGUFFile:
    return GGUFFile(path)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """The parsed file, shared within a process while the file is unchanged."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise GGUFError(path, "no such file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise GGUFError(path, "symlink loop (too many levels of symbolic links)") from None
        raise GGUFError(path, f"cannot read: {e.strerror or e}") from None
    return _open(str(p), st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------------------- the model


def _layer_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Tensors of one layer (name after `blk.L.`) and their numpy shapes."""
    D, d, H, Hkv, F = spec.d_model, spec.d_head, spec.heads, spec.kv_heads, spec.d_ff
    out = {
        "attn_norm.weight": (D,),
        "attn_q.weight": (H * d, D), "attn_k.weight": (Hkv * d, D), "attn_v.weight": (Hkv * d, D),
        "attn_output.weight": (D, H * d),
        "ffn_norm.weight": (D,),
        "ffn_gate.weight": (F, D), "ffn_up.weight": (F, D), "ffn_down.weight": (D, F),
    }
    if spec.attn_bias:
        out.update({"attn_q.bias": (H * d,), "attn_k.bias": (Hkv * d,), "attn_v.bias": (Hkv * d,)})
    if spec.proj_bias:
        out["attn_output.bias"] = (D,)
    return out


def expected_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor a file of this spec holds, with its numpy shape."""
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (spec.vocab, spec.d_model),
                                       "output_norm.weight": (spec.d_model,)}
    if not spec.tied_head:
        out["output.weight"] = (spec.vocab, spec.d_model)
    if spec.rope_freqs:
        out["rope_freqs.weight"] = (spec.d_head // 2,)
    for layer in range(spec.layers):
        out.update({f"blk.{layer}.{k}": v for k, v in _layer_tensors(spec).items()})
    return out


def _read_spec(g: GGUFFile) -> ModelSpec:
    arch = g.field("general.architecture")
    if arch is None:
        raise GGUFError(g.path, "general.architecture: missing")
    if arch not in ARCHS:
        raise GGUFError(g.path, f"general.architecture: {arch!r} is not supported "
                        f"(supported: {', '.join(ARCHS)})")

    def key(name: str, default: Any = ..., kind: type = int) -> Any:
        full = f"{arch}.{name}"
        value = g.field(full)
        if value is None:
            if default is ...:
                raise GGUFError(g.path, f"{full}: missing")
            return default
        if isinstance(value, list | str | bool):
            raise GGUFError(g.path, f"{full}: expected one number, got {type(value).__name__}")
        return kind(value)

    layers, D = key("block_count"), key("embedding_length")
    if not 0 < layers <= len(g.tensors):  # before anything is built per layer
        raise GGUFError(g.path, f"{arch}.block_count: {layers} layers, but the file holds {len(g.tensors)} tensors")
    heads = key("attention.head_count")
    kv_heads = key("attention.head_count_kv", heads)
    if heads <= 0 or kv_heads <= 0 or D % heads or heads % kv_heads:
        raise GGUFError(g.path, f"{arch}.attention.head_count: {heads} heads and {kv_heads} K/V heads "
                        f"do not divide embedding_length {D} into equal groups")
    d_head = D // heads
    for name in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        n = key(name, d_head)
        if n != d_head:
            raise GGUFError(g.path, f"{arch}.{name}: {n}, but this testbed needs the whole head "
                            f"(embedding_length / head_count = {d_head})")
    if "token_embd.weight" not in g.tensors:
        raise GGUFError(g.path, "tensor 'token_embd.weight': missing")
    vocab = g.tensors["token_embd.weight"].shape[0]
    rope_freqs: tuple[float, ...] = ()
    scaling = g.field(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        factor = key("rope.scaling.factor", 1.0, float)
        if factor != 1.0:
            rope_freqs = (factor,) * (d_head // 2)
    elif scaling != "none":
        raise GGUFError(g.path, f"{arch}.rope.scaling.type: {scaling!r} is not supported (none, linear, "
                        "or Llama 3's rope_freqs tensor)")
    if "rope_freqs.weight" in g.tensors:
        info = g.tensors["rope_freqs.weight"]
        if info.shape != (d_head // 2,):
            raise GGUFError(g.path, f"tensor 'rope_freqs.weight': shape {list(info.shape)}, expected "
                            f"[{d_head // 2}] (one factor per rotary pair)")
        factors = [float(x) for x in g.array("rope_freqs.weight")]
        rope_freqs = tuple(a * b for a, b in zip(rope_freqs or (1.0,) * len(factors), factors, strict=True))
    spec = ModelSpec(
        name=g.path.stem, layers=layers, heads=heads, d_model=D, vocab=vocab,
        d_ff=key("feed_forward_length"), kv_heads=kv_heads, context=key("context_length"),
        norm="rmsnorm", mlp="swiglu", positions="rope",
        attn_bias="blk.0.attn_q.bias" in g.tensors,
        proj_bias="blk.0.attn_output.bias" in g.tensors,
        tied_head="output.weight" not in g.tensors,
        rope_base=key("rope.freq_base", 10000.0, float), rope_freqs=rope_freqs,
        norm_eps=key("attention.layer_norm_rms_epsilon", kind=float),
        weights="gguf", gguf=str(g.path.resolve()),
    )
    for f, msg in spec.problems():
        raise GGUFError(g.path, f"the metadata gives an unusable model: {f} {msg}")
    _check_tensors(g, spec)
    return spec


def _check_tensors(g: GGUFFile, spec: ModelSpec) -> None:
    want = expected_tensors(spec)
    for name, shape in want.items():
        info = g.tensors.get(name)
        if info is None:
            raise GGUFError(g.path, f"tensor {name!r}: missing (the metadata gives {spec.layers} layers)")
        if info.shape != shape:
            raise GGUFError(g.path, f"tensor {name!r}: shape {list(info.shape)}, the metadata implies {list(shape)}")
        if info.type not in TYPES:
            raise GGUFError(g.path, f"tensor {name!r}: type {info.type} is not supported "
                            f"(supported: {', '.join(TYPES)})")
    ignored = {n for n in g.tensors if n.endswith(".attn_rot_embd")}  # old files: unused
    extra = sorted(set(g.tensors) - set(want) - ignored)
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise GGUFError(g.path, f"tensor {extra[0]!r}{more}: not part of the {spec_arch(g)} layout this "
                        "testbed runs (norms, Q/K/V/O, SwiGLU FFN, embedding, LM head)")
    tokens = g.count("tokenizer.ggml.tokens")
    if tokens == 0:
        raise GGUFError(g.path, "tokenizer.ggml.tokens: missing (the file has no vocabulary)")
    if tokens > spec.vocab:
        raise GGUFError(g.path, f"tokenizer.ggml.tokens: {tokens} tokens but the embedding has {spec.vocab} rows")


def spec_arch(g: GGUFFile) -> str:
    return str(g.field("general.architecture"))


def spec_from_gguf(path: str | os.PathLike) -> ModelSpec:
    """The model a GGUF file holds (sizes, norms, RoPE, biases, LM head) as a float32 spec
    named after the file, or GGUFError naming the first problem."""
    g = open_gguf(path)
    if g.spec is None:
        g.spec = _read_spec(g)
    return g.spec
