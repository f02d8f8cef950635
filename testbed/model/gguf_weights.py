"""Weights from a llama-family GGUF file, cut into this testbed's blocks (a `WeightSource`).

Owns `GGUFWeights` and `check_spec` (a spec may choose its dtype and a shorter context, but
every size and architectural choice must be the file's). Does not own the file format
(gguf_file.py) or the arithmetic (blocks.py). Nothing here downloads.

Loading is per block and lazy: `block(name)` dequantises only that block's rows (a K/V
group's Q/K/V slices, not the layer's whole matrices), a chunk at a time, straight into the
returned tensor, so a process holds the blocks it asked for plus one chunk in flight.

Tensor mapping (llama.cpp names; numpy shapes, the GGUF dims reversed, i.e. [out, in] as
torch.nn.Linear wants them):
  token_embd.weight  [V, D]         -> source `wte`
  output.weight      [V, D]         -> source `wout` (absent when the LM head is tied)
  output_norm.weight [D]            -> source `norm.w`
  blk.L.attn_norm    [D]            -> `norm.w` of every head.L.G (each group holds a copy)
  blk.L.attn_q       [H*d, D]       -> head.L.G `wq` = rows of query heads G*q .. G*q+q-1
  blk.L.attn_k/v     [Hkv*d, D]     -> head.L.G `wk`/`wv` = rows of K/V head G
  blk.L.attn_q/k/v.bias             -> `bq`/`bk`/`bv`, the same rows (qwen2)
  blk.L.attn_output  [D, H*d]       -> proj.L `wo` (and `bo` if the file has a bias)
  blk.L.ffn_norm/gate/up/down       -> ffn.L `norm.w`, `wg` [F, D], `wu` [F, D], `wd` [D, F]
llama.cpp's GQA shares K/V head h // (H / Hkv) with query head h, so consecutive query heads
form a group, which is what our head blocks assume. For llama files the converter has
already permuted each head's Q/K rows into interleaved rotary pairs, which `blocks.rope`
rotates; qwen2 files keep the Hugging Face order (pairs i and i + d/2, llama.cpp's "neox"
RoPE), so their Q/K rows (and biases) are re-ordered here into interleaved pairs, which
leaves every attention score unchanged.

The weights are the file's, dequantised: outputs match llama.cpp running the file, not the
bf16 checkpoint it was quantised from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from .blocks import TORCH_DTYPES, Tensors, shard_ffn
from .gguf_file import open_gguf, spec_arch, spec_from_gguf
from .spec import Block, ModelSpec

# fields a scenario may set differently from the file (the others are the file's)
FREE_FIELDS = ("name", "dtype", "context", "weights", "gguf", "ffn_shards")


def check_spec(spec: ModelSpec, path: str | Path) -> ModelSpec:
    """The file's own spec; ValueError naming each field where `spec` differs from it."""
    file_spec = spec_from_gguf(path)
    bad = []
    for f in dataclasses.fields(ModelSpec):
        if f.name in FREE_FIELDS:
            continue
        ours, theirs = getattr(spec, f.name), getattr(file_spec, f.name)
        same: bool
        if isinstance(theirs, float):
            same = bool(torch.tensor(ours, dtype=torch.float32) == torch.tensor(theirs, dtype=torch.float32))
        elif isinstance(theirs, tuple):
            same = len(ours) == len(theirs) and bool(
                (torch.tensor(ours, dtype=torch.float32) == torch.tensor(theirs, dtype=torch.float32)).all())
        else:
            same = ours == theirs
        if not same:
            bad.append(f"{f.name} {ours!r} != {theirs!r}")
    if spec.context > file_spec.context:
        bad.append(f"context {spec.context} > the model's {file_spec.context}")
    if bad:
        raise ValueError(f"spec {spec.name!r} does not match {Path(path).name}: " + "; ".join(bad))
    return file_spec


def _interleave(d: int) -> torch.Tensor:
    """Row order that turns rotate-by-halves pairs (i, i + d/2) into adjacent pairs (2i, 2i+1)."""
    i = torch.arange(d)
    return i // 2 + (i % 2) * (d // 2)


class GGUFWeights:
    """WeightSource over a GGUF file. Every call dequantises afresh (nothing is cached, so a
    device that loads a few blocks pays only for those); returned tensors are fresh
    contiguous tensors in the spec dtype."""

    def __init__(self, spec: ModelSpec, path: str | Path | None = None) -> None:
        self.spec = spec
        self.path = Path(path if path is not None else spec.gguf)
        self.file = open_gguf(self.path)
        check_spec(spec, self.path)
        self.arch = spec_arch(self.file)
        self.dtype = TORCH_DTYPES[spec.dtype]

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start..stop-1 of a tensor (a vector: its values) in the spec dtype."""
        info = self.file.tensors[name]
        n = (stop if stop is not None else info.shape[0]) - start
        out = torch.empty((n, info.shape[-1]) if len(info.shape) > 1 else (info.shape[0],), dtype=self.dtype)
        flat = out.view(-1, info.shape[-1])
        for r, chunk in self.file.iter_rows(name, start, stop):
            part = torch.from_numpy(np.require(chunk, requirements="W"))  # F32: a read-only view
            flat[r - start:r - start + part.shape[0]] = part  # converts to the spec dtype
        return out

    def _qk(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Q or K rows (weights or biases) of whole heads, in interleaved rotary order."""
        t = self.rows(name, start, stop) if name.endswith(".weight") else self.rows(name)[start:stop].clone()
        if self.arch == "qwen2":
            d = self.spec.d_head
            t = t.view(-1, d, *t.shape[1:])[:, _interleave(d)].reshape(t.shape)
        return t

    def block(self, name: str) -> Tensors:
        s, b = self.spec, Block.parse(name)
        if not 0 <= b.layer < s.layers:
            raise KeyError(f"{name}: layer out of range (model has {s.layers})")
        p = f"blk.{b.layer}."
        if b.kind == "head":
            if not 0 <= b.index < s.groups:
                raise KeyError(f"{name}: group out of range (model has {s.groups} K/V groups)")
            qd, d, g = s.q_per_group * s.d_head, s.d_head, b.index
            w = {
                "norm.w": self.rows(p + "attn_norm.weight"),
                "wq": self._qk(p + "attn_q.weight", g * qd, (g + 1) * qd),
                "wk": self._qk(p + "attn_k.weight", g * d, (g + 1) * d),
                "wv": self.rows(p + "attn_v.weight", g * d, (g + 1) * d),
            }
            if s.attn_bias:
                w["bq"] = self._qk(p + "attn_q.bias", g * qd, (g + 1) * qd)
                w["bk"] = self._qk(p + "attn_k.bias", g * d, (g + 1) * d)
                w["bv"] = self.rows(p + "attn_v.bias")[g * d:(g + 1) * d].clone()
            return w
        if b.kind == "proj":
            w = {"wo": self.rows(p + "attn_output.weight")}
            if s.proj_bias:
                w["bo"] = self.rows(p + "attn_output.bias")
            return w
        if name not in s.block_names:
            raise KeyError(f"{name}: not a block of this model")
        w = {
            "norm.w": self.rows(p + "ffn_norm.weight"),
            "wg": self.rows(p + "ffn_gate.weight"),
            "wu": self.rows(p + "ffn_up.weight"),
            "wd": self.rows(p + "ffn_down.weight"),
        }
        return shard_ffn(s, w, b.index) if s.sharded else w

    def source(self) -> Tensors:
        w = {"wte": self.rows("token_embd.weight"), "norm.w": self.rows("output_norm.weight")}
        if not self.spec.tied_head:
            w["wout"] = self.rows("output.weight")
        return w
