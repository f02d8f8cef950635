"""This testbed's reference against an independent implementation, Hugging Face transformers,
loading the same GGUF files (tools/crosscheck_gguf.py): prompt ids, greedy ids and logits.

- the shipped SmolLM2-135M file: the prompt, 30 generated ids and their logits;
- every synthetic variant (llama, Llama 3 with rope_freqs, TinyLlama-like, qwen2) x tensor
  type: 10 generated ids and their logits;
- dequantisation: the gguf library (which both sides use for these architectures) against
  transformers' own torch kernels, and, for Q5_0/Q5_1 that those lack, a transcription of
  ggml's reference C code.
Tolerance on logits: TOL (absolute), printed with the measured differences (pytest -s).
Skips when transformers is not installed (pip install -e '.[crosscheck]').
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded
pytest.importorskip("transformers", reason="the crosscheck extra is not installed (pip install -e '.[crosscheck]')")
pytest.importorskip("accelerate", reason="the crosscheck extra is not installed (pip install -e '.[crosscheck]')")

from testbed.model import smollm2  # noqa: E402
from testbed.model.gguf_synth import K_SCALES, LLAMA3_ROPE, READ_ONLY, WRITABLE, _k_blocks  # noqa: E402
from tools.crosscheck_gguf import PROMPT, crosscheck, dequant_diff  # noqa: E402

from .conftest import GGUF_VARIANTS  # noqa: E402

TOL = 1e-4
TYPES = WRITABLE + READ_ONLY


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> None:
    torch.set_num_threads(1)


def _report(name: str, r: Any) -> None:
    print(f"\n{name}: prompt {r.prompt_ours == r.prompt_theirs} ({len(r.prompt_ours)} ids), "
          f"generated {r.ids_ours == r.ids_theirs} ({len(r.ids_ours)} ids), "
          f"max |logit diff| {r.max_logit_diff:.2e} (tolerance {TOL:.0e}, largest |logit| {r.max_logit:.1f})")


@pytest.mark.skipif(not smollm2.available(), reason=f"SmolLM2 weights not installed ({smollm2.PIP_HINT})")
def test_shipped_smollm2_equals_transformers() -> None:
    r = crosscheck(smollm2.gguf_path(), PROMPT, 30)
    _report("SmolLM2-135M-Instruct.Q4_1", r)
    assert r.prompt_ours == r.prompt_theirs == [504, 3575, 282, 4649, 314]
    assert r.ids_ours == r.ids_theirs and len(r.ids_ours) == 30
    assert r.max_logit_diff <= TOL


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("variant", list(GGUF_VARIANTS))
def test_synthetic_file_equals_transformers(variant: str, qtype: str, synth_gguf: Any) -> None:
    rope = LLAMA3_ROPE if GGUF_VARIANTS[variant].get("llama3_rope") else None
    r = crosscheck(synth_gguf(variant, qtype), PROMPT, 10, llama3_rope=rope)
    _report(f"{variant} {qtype}", r)
    assert r.prompt_ours == r.prompt_theirs and len(r.prompt_ours) >= 5
    assert r.ids_ours == r.ids_theirs and len(set(r.ids_ours)) > 1
    assert r.max_logit_diff <= TOL


def test_llama3_rope_freqs_matter_to_transformers_too(synth_gguf: Any) -> None:
    """Without the RoPE scaling transformers computes another model: the check can fail."""
    r = crosscheck(synth_gguf("llama3", "F32"), PROMPT * 6, 4, llama3_rope=None)
    _report("llama3 F32 without rope scaling on the transformers side", r)
    assert r.max_logit_diff > 100 * TOL


def _random_rows(qtype: str, rows: int = 64, cols: int = 512, seed: int = 0) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    if qtype in K_SCALES:
        return _k_blocks(rows, cols, qtype, 0.05, rng)
    a = rng.standard_normal((rows, cols), dtype=np.float32) * 0.05
    if qtype == "F16":
        return a.astype(np.float16)
    return quantize(a, GGMLQuantizationType[qtype])


@pytest.mark.parametrize("qtype", [t for t in TYPES if t not in ("F32", "Q5_0", "Q5_1")])
def test_dequantisation_equals_transformers_kernels(qtype: str) -> None:
    diff = dequant_diff(_random_rows(qtype), qtype)
    print(f"\n{qtype}: gguf vs transformers dequantisation, max |diff| {diff:.1e}")
    assert diff <= 1e-6


def _ggml_q5(raw: np.ndarray, with_min: bool) -> np.ndarray:
    """ggml's dequantize_row_q5_0 / q5_1, one block at a time, as its C code reads."""
    out = []
    for b in raw.reshape(-1, 24 if with_min else 22):
        d = float(b[0:2].view(np.float16)[0])
        m = float(b[2:4].view(np.float16)[0]) if with_min else 0.0
        at = 4 if with_min else 2
        qh = int(b[at:at + 4].view(np.uint32)[0])
        qs = b[at + 4:at + 20]
        lo, hi = [], []
        for j in range(16):
            x0 = (int(qs[j]) & 0x0F) | (((qh >> j) << 4) & 0x10)
            x1 = (int(qs[j]) >> 4) | ((qh >> (j + 12)) & 0x10)
            if with_min:
                lo.append(x0 * d + m)
                hi.append(x1 * d + m)
            else:
                lo.append((x0 - 16) * d)
                hi.append((x1 - 16) * d)
        out.extend(lo + hi)
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1"])
def test_q5_dequantisation_equals_ggml_reference(qtype: str) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = _random_rows(qtype, rows=4, cols=256)
    ours = dequantize(raw, GGMLQuantizationType[qtype]).reshape(-1)
    ref = _ggml_q5(raw, qtype == "Q5_1")
    assert ref.std() > 0.01
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
