"""The roofline devices against published decode speeds.

`python -m tools.bench.roofline`

For each device preset with a published llama.cpp figure for a model of known size, the
emulated decode speed of that model held whole on the device (tokens per second), beside the
published figure and their ratio. The emulated figure is the device's `ComputeUnit` on the
virtual clock running the jobs of llama-bench's `tg128` (128 tokens generated after an empty
prompt) as a device agent submits them: per layer the layer's heads as one job, proj, ffn,
then the LM head, each of the cost model's FLOPs and bytes (`cost.span_flops`,
`cost.span_bytes`), so it is the same arithmetic the emulator and the estimator use. No
link, no host time: one device, nothing else. Deterministic; docs/devices.md quotes it
(tools/docs/figures.py regenerates it, tests/test_docfigures.py checks it).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from testbed.emulation.clock import new_loop
from testbed.emulation.compute import ComputeUnit
from testbed.model import cost
from testbed.model.spec import ModelSpec
from testbed.scenario import presets

# Llama 2 7B (Touvron et al., "Llama 2", Meta, 2023; 6.74 B parameters), as llama.cpp's
# "LLaMA 7B" rows run it, in F16: 13.5 GB of weights
LLAMA2_7B = ModelSpec(name="llama-2-7b", layers=32, heads=32, d_model=4096, vocab=32000, d_ff=11008,
                      context=4096, dtype="float16", norm="rmsnorm", mlp="swiglu", positions="rope",
                      attn_bias=False, tied_head=False)
TOKENS = 128  # llama-bench tg128

# llama.cpp discussion #4167 on GitHub, "Performance of llama.cpp on Apple Silicon
# M-series" (G. Gerganov and contributors, 2023): LLaMA 7B, F16, tg128, Metal, tokens/s
SOURCE = "llama.cpp GitHub discussion #4167, Apple Silicon M-series table (2023): LLaMA 7B F16 tg128"


@dataclass(frozen=True)
class Published:
    preset: str
    chip: str
    tokens_per_s: float


PUBLISHED = (
    Published("macbook-air-m2", "M2, 10-core GPU", 6.72),
    Published("macbook-pro-m1-pro", "M1 Pro, 16-core GPU", 12.75),
    Published("macbook-pro-m1-max", "M1 Max, 32-core GPU", 23.03),
    Published("mac-studio-m2-ultra", "M2 Ultra, 76-core GPU", 41.02),
)


def emulated_tokens_per_s(spec: ModelSpec, preset: str, tokens: int = TOKENS) -> float:
    """Tokens per second of `tokens` decode steps (positions 0 .. tokens-1) of `spec` whole
    on the preset device, on the emulated device's compute unit (virtual clock)."""
    p = presets.DEVICES[preset]
    unit = ComputeUnit(preset, p.compute_gflops * 1e9, p.memory_bandwidth_gbps * 1e9)
    G = spec.groups
    loop = new_loop("virtual")

    async def decode() -> float:
        t0 = loop.time()
        for pos in range(tokens):
            for _ in range(spec.layers):
                await unit.run(G * cost.span_flops(spec, "head", pos, 1), _nothing,
                               nbytes=G * cost.span_bytes(spec, "head", pos, 1))
                for kind in ("proj", "ffn"):
                    await unit.run(cost.span_flops(spec, kind, pos, 1), _nothing,
                                   nbytes=cost.span_bytes(spec, kind, pos, 1))
            await unit.run(cost.source_flops(spec), _nothing, nbytes=cost.source_bytes(spec))
        return loop.time() - t0

    try:
        elapsed = loop.run_until_complete(asyncio.wait_for(decode(), 60.0))
    finally:
        loop.close()
    return tokens / elapsed


def _nothing() -> None:
    return None


def rows() -> list[tuple[Published, float]]:
    return [(p, emulated_tokens_per_s(LLAMA2_7B, p.preset)) for p in PUBLISHED]


def table() -> str:
    """The validation table (markdown)."""
    weights = (cost.model_weight_bytes(LLAMA2_7B) + cost.source_weight_bytes(LLAMA2_7B)) / 1e9
    out = [f"Model: {LLAMA2_7B.name}, F16, {weights:.2f} GB of weights; {TOKENS} tokens after an empty prompt.",
           "",
           "| preset | chip | memory bandwidth (GB/s) | emulated (tokens/s) | published (tokens/s) | emulated / published |",
           "|---|---|---|---|---|---|"]
    for p, emulated in rows():
        d = presets.DEVICES[p.preset]
        out.append(f"| `{p.preset}` | {p.chip} | {d.memory_bandwidth_gbps:g} | {emulated:.2f} | "
                   f"{p.tokens_per_s:.2f} | {emulated / p.tokens_per_s:.2f} |")
    out += ["", f"Published: {SOURCE}."]
    return "\n".join(out)


def main() -> int:
    print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
