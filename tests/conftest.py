"""Shared test helpers: small scenarios built in code, a fixed-placement algorithm, and a
one-call virtual-clock run; and the suite's hypothesis profile.

Property tests draw the same examples on every run (`derandomize`), so the suite passes or
fails the same way on every machine and every try: a CI verdict does not depend on a draw.
To search for new failing inputs, run with `TESTBED_HYPOTHESIS=explore` (random examples,
failures remembered in `.hypothesis/`), and with `TESTBED_FUZZ_EXAMPLES=N` for longer fuzzing.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from testbed.experiments import run as experiment
from testbed.placement.problem import Placement, Snapshot
from testbed.scenario import Scenario, parse

settings.register_profile("repeatable", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("TESTBED_HYPOTHESIS", "repeatable"))

DEVICE_TEMPLATES = [
    ("src", 8.0, 256), ("a", 20.0, 512), ("b", 3.0, 128), ("c", 5.0, 192),
    ("d", 12.0, 256), ("e", 2.0, 96),
]


def scenario_dict(preset: str = "gpt-tiny", n_devices: int = 4, new_tokens: int = 5, prompt: int = 4,
                  seed: int = 0, algorithm: str = "resource_aware", telemetry: str = "oracle",
                  interval: int = 2, events: list[dict] | None = None, memory_mib: float | None = None,
                  bandwidth_mbps: float = 100.0, latency_ms: float = 1.0, **model: Any) -> dict:
    devices = []
    for name, gflops, mib in DEVICE_TEMPLATES[:n_devices]:
        devices.append({"name": name, "compute_gflops": gflops, "memory_mib": memory_mib or mib})
    return {
        "version": 1, "name": "test", "seed": seed,
        "model": {"preset": preset, **model},
        "generation": {"prompt_tokens": prompt, "new_tokens": new_tokens},
        "devices": devices, "source": devices[0]["name"],
        "network": {"default": {"bandwidth_mbps": bandwidth_mbps, "latency_ms": latency_ms}},
        "controller": {"algorithm": algorithm, "interval_tokens": interval, "telemetry": telemetry},
        "events": events or [],
    }


def make_scenario(**kw: Any) -> Scenario:
    return parse(scenario_dict(**kw), "<test>")


class Fixed:
    """An algorithm that always answers the same placement (device indices per block)."""

    name = "fixed"
    dynamic = False

    def __init__(self, assign: list[int] | tuple[int, ...]) -> None:
        self.assign = tuple(assign)

    def place(self, snap: Snapshot) -> Placement:
        return Placement(snap.spec, self.assign)


class Scripted:
    """A dynamic algorithm that answers a given sequence of placements, one per decision
    (then keeps the last)."""

    name = "scripted"
    dynamic = True

    def __init__(self, plans: list[tuple[int, ...]]) -> None:
        self.plans, self.calls = plans, 0

    def place(self, snap: Snapshot) -> Placement:
        p = self.plans[min(self.calls, len(self.plans) - 1)]
        self.calls += 1
        return Placement(snap.spec, p)


def run_virtual(scenario: Scenario, algorithm: Any, out: Path,
                prep: experiment.Prepared | None = None) -> experiment.Outcome:
    prep = prep or experiment.prepare(scenario)
    name = algorithm if isinstance(algorithm, str) else algorithm.name
    run_dir = out / f"{name}-{len(list(out.glob('*'))) if out.exists() else 0}"
    return experiment.run(prep, algorithm, run_dir, clock="virtual")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def fresh_dir(parent: Path) -> Path:
    """A new directory under parent (hypothesis examples share one tmp_path)."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=parent))


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "results"
    d.mkdir()
    return d


# ---------------------------------------------------------------------------- synthetic GGUF files

# llama-family variants the GGUF tests cover, each with its own tokenizer kind: SmolLM2-like
# (tied head, "smollm" BPE), Llama 3.x-like (rope_freqs, "llama-bpe" BPE with BOS),
# TinyLlama-like (untied LM head, SentencePiece with scores, 8 heads of 32) and
# Qwen2.5-like (Q/K/V biases, Q/K rows rotated by halves, "qwen2" BPE)
GGUF_VARIANTS = {
    "llama": dict(arch="llama", tokenizer="smollm"),
    "llama3": dict(arch="llama", tokenizer="llama-bpe", llama3_rope=True, rope_base=500000.0),
    "tinyllama": dict(arch="llama", tokenizer="spm", tied=False, heads=8, kv_heads=4),
    "qwen2": dict(arch="qwen2", tokenizer="qwen2", rope_base=1000000.0, norm_eps=1e-6),
}


@pytest.fixture(scope="session")
def synth_gguf(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """synth_gguf(variant, qtype) -> path of a small random-weight GGUF file (written once
    per session)."""
    from testbed.model.gguf_synth import Synth, write_gguf

    folder = tmp_path_factory.mktemp("gguf")
    made: dict[tuple[str, str], Path] = {}

    def make(variant: str, qtype: str) -> Path:
        if (variant, qtype) not in made:
            synth = Synth(qtype=qtype, seed=len(made), **GGUF_VARIANTS[variant])
            made[variant, qtype] = write_gguf(folder / f"{variant}-{qtype}.gguf", synth)
        return made[variant, qtype]

    return make
