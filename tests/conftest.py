"""Shared test helpers: small scenarios built in code, a fixed-placement algorithm, and a
one-call virtual-clock run."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest

from testbed import experiment
from testbed.placement.problem import Placement, Snapshot
from testbed.scenario import Scenario, parse

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
