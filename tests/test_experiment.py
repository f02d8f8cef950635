"""One run end to end (testbed/experiments/run.py): what the run driver does when the world
reports something the scenario did not script."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from testbed.experiments import run as experiment
from testbed.harness.interface import World

from .conftest import make_scenario, read_csv


def test_an_agent_lost_outside_the_scenario_is_recovered_when_the_controller_hears_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A world that notices a lost agent itself (agent processes: its control connection
    closed before any peer reported the device down) calls the run's `on_lost`; the run
    recovers the device as it does for `fail_device`, and its tokens equal the reference."""
    scenario = make_scenario(n_devices=4, new_tokens=8)
    prep = experiment.prepare(scenario)
    told: dict[str, Any] = {}
    real = experiment.make_world

    def capture(*args: Any, **kw: Any) -> World:
        told["on_lost"] = args[5] if len(args) > 5 else kw["on_lost"]
        return real(*args, **kw)

    monkeypatch.setattr(experiment, "make_world", capture)

    def progress(k: int) -> None:
        if k == 3:  # after token 3: the world says device b is gone
            told["on_lost"]("b", "its control connection closed")

    out = experiment.run(prep, "resource_aware", tmp_path / "run", clock="virtual", progress=progress)
    assert out.status == "completed", out.status
    assert out.summary["correctness"]["tokens_match"]
    kinds = [(e["kind"], e["subject"]) for e in read_csv(out.run_dir / "events.csv")]
    assert ("device_failed", "b") in kinds
    assert any(kind == "recovered" for kind, _ in kinds)
    placed = {r["device"] for r in read_csv(out.run_dir / "placements.csv") if int(r["token"]) > 3}
    assert "b" not in placed
