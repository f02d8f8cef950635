"""`python -m tools.crosscheck_gguf FILE.gguf [--prompt TEXT] [--tokens N]`: this testbed's
monolithic reference against Hugging Face transformers on the same GGUF file.

transformers reads the file by itself: its config from the metadata, its own Llama/Qwen2
code (rotation by halves, after un-permuting llama files' Q/K rows), its own conversion of
the vocabulary into a tokenizer. Both sides run greedy decoding in float32 from the same
prompt text; the tool prints the prompt ids, the generated ids and the largest logit
difference, and exits 0 when the ids are equal and the logits within `--tol`.

Limits of the independence: transformers 5.24 dequantises llama and qwen2 files with the
gguf library, as this testbed does, so `dequant_diff` compares that library with
transformers' own torch dequantisation separately (tests/test_gguf_crosscheck.py). And it
ignores a Llama 3 file's `rope_freqs` tensor: give the file's RoPE scaling with
`--llama3-rope FACTOR,LOW,HIGH,ORIGINAL_CONTEXT` (Llama 3.2: 32,1,4,8192), else the two sides
differ (as they should: transformers would be computing another model). Needs the
`crosscheck` extra; works offline (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' per-tensor progress bars

PROMPT = "The capital of France is"


@dataclass
class Result:
    prompt_ours: list[int]
    prompt_theirs: list[int]
    ids_ours: list[int]
    ids_theirs: list[int]
    max_logit_diff: float
    max_logit: float

    @property
    def ids_equal(self) -> bool:
        return self.prompt_ours == self.prompt_theirs and self.ids_ours == self.ids_theirs

    def ok(self, tol: float) -> bool:
        return self.ids_equal and self.max_logit_diff <= tol


def ours(path: str | Path, prompt: str, new_tokens: int) -> tuple[list[int], list[int], Any]:
    """Prompt ids, greedy ids and their [n, V] logits from this testbed's reference."""
    from testbed.model.blocks import Reference
    from testbed.model.gguf_file import spec_from_gguf
    from testbed.model.gguf_weights import GGUFWeights
    from testbed.model.tokenizer import load_tokenizer

    ids = load_tokenizer(path).encode(prompt)
    out, logits = Reference(GGUFWeights(spec_from_gguf(path))).generate(ids, new_tokens)
    return ids, out, logits


def load_transformers(path: str | Path, llama3_rope: dict[str, float] | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) as transformers loads the file, float32, eager attention."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    p = Path(path).resolve()
    config = None  # read from the file (each read parses the whole file: only when needed)
    if llama3_rope:
        config = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
        config.rope_parameters = {"rope_type": "llama3", "rope_theta": config.rope_parameters["rope_theta"],
                                  **llama3_rope}
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, config=config,
                                                 dtype=torch.float32, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    return model.eval(), tokenizer


def theirs(path: str | Path, prompt: str, new_tokens: int,
           llama3_rope: dict[str, float] | None = None) -> tuple[list[int], list[int], Any]:
    """The same from transformers: prompt ids from its tokenizer, then greedy decoding with
    its K/V cache (by hand, so that no generation config or end token intervenes)."""
    import torch

    model, tokenizer = load_transformers(path, llama3_rope)
    ids = list(tokenizer(prompt)["input_ids"])
    rows, out = [], []
    with torch.inference_mode():
        o = model(torch.tensor([ids]), use_cache=True)
        while True:
            rows.append(o.logits[0, -1].float())
            out.append(int(rows[-1].argmax()))
            if len(out) == new_tokens:
                break
            o = model(torch.tensor([[out[-1]]]), cache=o.cache, use_cache=True)
    return ids, out, torch.stack(rows)


def crosscheck(path: str | Path, prompt: str = PROMPT, new_tokens: int = 30,
               llama3_rope: dict[str, float] | None = None) -> Result:
    import torch

    torch.set_num_threads(int(os.environ.get("TESTBED_TORCH_THREADS", "1")))
    p_ours, ids_ours, l_ours = ours(path, prompt, new_tokens)
    p_theirs, ids_theirs, l_theirs = theirs(path, prompt, new_tokens, llama3_rope)
    n = min(len(l_ours), len(l_theirs))
    # logits are comparable while both sides were fed the same tokens
    same = next((i for i in range(n) if ids_ours[i] != ids_theirs[i]), n - 1) + 1
    diff = float((l_ours[:same] - l_theirs[:same]).abs().max()) if p_ours == p_theirs else float("inf")
    return Result(p_ours, p_theirs, ids_ours, ids_theirs, diff, float(l_ours.abs().max()))


def dequant_diff(raw: Any, qtype: str) -> float:
    """Largest difference between the gguf library's dequantisation of packed rows and
    transformers' own torch kernels (F16/BF16: torch's reading of the bytes)."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    t = GGMLQuantizationType[qtype]
    ref = torch.from_numpy(np.ascontiguousarray(dequantize(raw, t)).reshape(-1).astype(np.float32))
    data = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(-1).copy())
    if qtype in ("F16", "BF16"):
        other = data.view(torch.float16 if qtype == "F16" else torch.bfloat16).float()
    else:
        other = hf_dequantize(data, int(t))
    return float((ref - other).abs().max())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.crosscheck_gguf", description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", help="a llama or qwen2 GGUF file")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--tol", type=float, default=1e-4, help="largest logit difference allowed (default 1e-4)")
    ap.add_argument("--llama3-rope", metavar="F,LOW,HIGH,CTX",
                    help="the file's Llama 3 RoPE scaling, for transformers (which ignores rope_freqs)")
    args = ap.parse_args(argv)
    rope = None
    if args.llama3_rope:
        f, lo, hi, ctx = (float(x) for x in args.llama3_rope.split(","))
        rope = {"factor": f, "low_freq_factor": lo, "high_freq_factor": hi,
                "original_max_position_embeddings": int(ctx)}
    r = crosscheck(args.gguf, args.prompt, args.tokens, rope)
    print(f"prompt ids    ours {r.prompt_ours}\n              transformers {r.prompt_theirs}")
    print(f"generated     ours {r.ids_ours}\n              transformers {r.ids_theirs}")
    print(f"logits        max |diff| {r.max_logit_diff:.2e} (tolerance {args.tol:.0e}; largest |logit| "
          f"{r.max_logit:.1f})")
    print("equal" if r.ok(args.tol) else "DIFFERENT")
    return 0 if r.ok(args.tol) else 1


if __name__ == "__main__":
    sys.exit(main())
