"""What every algorithm's run of one scenario shares: the weights (built once per process),
the prompt and the monolithic reference's tokens and logits.

Owns `prepare` and its record `Prepared`, and `CachedWeights`, the weight cache that the
reference and every in-process device read. Computing the reference is the slow part of
preparing a scenario; a command that runs several algorithms prepares once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..model.blocks import TORCH_THREADS, Reference, Tensors, WeightSource, fuse_qkv, random_prompt
from ..model.spec import ModelSpec
from ..model.weights import weights_for
from ..scenario.records import Scenario


class CachedWeights:
    """Weights built once per process and shared (read-only) by the reference and every
    device: building gpt2-small's blocks twice would double the set-up time. Head blocks
    are kept with Q/K/V fused, the form a live block holds, so that the reference and the
    devices share one copy instead of each fusing its own."""

    def __init__(self, inner: WeightSource) -> None:
        self.inner, self.spec = inner, inner.spec
        self._blocks: dict[str, Tensors] = {}
        self._source: Tensors | None = None

    def block(self, name: str) -> Tensors:
        if name not in self._blocks:
            w = self.inner.block(name)
            self._blocks[name] = fuse_qkv(w) if name.startswith("head.") else w
        return self._blocks[name]

    def source(self) -> Tensors:
        if self._source is None:
            self._source = self.inner.source()
        return self._source


@dataclass
class Prepared:
    """What every algorithm's run of one scenario shares."""

    scenario: Scenario
    model: ModelSpec
    weights: WeightSource
    prompt: list[int]
    ref_ids: list[int]
    ref_logits: torch.Tensor
    prompt_text: str | None = None
    tokenizer: Any = None


def prepare(scenario: Scenario) -> Prepared:
    torch.set_num_threads(TORCH_THREADS)  # the reference too: see run()
    model = scenario.model
    weights = CachedWeights(weights_for(model, scenario.seed))
    tokenizer = None
    gen = scenario.generation
    if gen.prompt is not None:
        from ..model.smollm2 import load_tokenizer

        tokenizer = load_tokenizer(model.gguf or None)  # a GGUF model's file, else the preset's
        prompt = tokenizer.encode(gen.prompt)
    else:
        prompt = random_prompt(model, scenario.seed, gen.prompt_tokens)
    ids, logits = Reference(weights).generate(prompt, gen.new_tokens)
    return Prepared(scenario, model, weights, prompt, ids, logits, gen.prompt, tokenizer)
