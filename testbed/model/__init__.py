"""The model: sizes and placeable blocks (`spec`, pure), their bytes and FLOPs (`cost`,
pure), the torch blocks and the monolithic reference (`blocks`), weights (`weights`,
seeded random, SmolLM2, GGUF files) and tokenizers.

Owns everything about the transformer itself. May import torch, numpy, gguf and
tokenizers (the checkpoint readers only when asked for); never imports any other testbed
package. `spec` and `cost` stay free of torch and asyncio.
"""
