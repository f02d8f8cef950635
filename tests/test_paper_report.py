"""The paper report states only what its inputs say: how the sweep ran (revision, machine,
worker processes), whether the emulator cross-check ran and what it found, and every
verdict with its numbers, all following the CSVs it is given."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from runners.sweep import write_csv
from testbed.experiments import paper_report


def _opt_rows(ls_ratio: float, ra_ratio: float) -> list[dict[str, Any]]:
    rows = []
    for d in (3, 4):
        for i in range(2):
            base = {"experiment": "optimality", "mode": "analytic", "devices": d, "instance": i,
                    "model": ["paper-small", "gpt-tiny"][i], "bandwidth_class": "small", "interval": 1,
                    "status": "completed", "tokens": 16}
            for alg, ratio in (("optimal", 1.0), ("resource_aware", ra_ratio), ("resource_aware_ls", ls_ratio)):
                rows.append({**base, "algorithm": alg, "latency_mean_ms": 2.0 * ratio})
    return rows


def _scale_rows(ls_speedup: float) -> list[dict[str, Any]]:
    rows = []
    for i in range(2):
        base = {"experiment": "scale", "mode": "analytic", "devices": 25, "instance": i, "model": "gpt2-small",
                "bandwidth_class": "large", "interval": 4, "status": "completed", "tokens": 40,
                "peak_device_memory_bytes": 4e8, "oom": 0, "migrations": 0}
        for alg, ms in (("layer_dp", 6.0), ("resource_aware", 7.0), ("resource_aware_ls", 6.0 / ls_speedup)):
            rows.append({**base, "algorithm": alg, "latency_mean_ms": ms})
    return rows


def _report(tmp: Path, *, jobs: int = 2, check: bool = False, ls_ratio: float = 1.0, ra_ratio: float = 1.17,
            ls_speedup: float = 1.0) -> str:
    write_csv(tmp / "optimality.csv", _opt_rows(ls_ratio, ra_ratio))
    write_csv(tmp / "scale.csv", _scale_rows(ls_speedup))
    write_csv(tmp / "timing.csv", [{"experiment": "optimality", "devices": 3, "model": "gpt-tiny", "instance": 0,
                                    "algorithm": "resource_aware_ls", "decision_ms_mean": 12.5, "wall_s": 0.1}])
    paper_report.write_report(tmp, wall_s=42.0, argv=["paper", "--quick"], check=check, jobs=jobs)
    return (tmp / "README.md").read_text()


@pytest.fixture(autouse=True)
def no_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cross-check's numbers come from here (the emulator itself is tested elsewhere)."""
    def fake() -> list[dict[str, Any]]:
        row = {"instance": "check-0", "model": "gpt-tiny", "devices": 3, "algorithm": "resource_aware",
               "tokens": 7, "interval": 1, "load_max": 0.29, "analytic_ms": 1.0, "emulated_ms": 1.01,
               "emulated_spread": 1.25, "max_rel_diff": 0.0123, "migrations": (0, 0), "tokens_match": True}
        return [row, {**row, "instance": "check-1", "devices": 4, "emulated_spread": 1.1, "migrations": (2, 2),
                      "max_rel_diff": 0.001}]

    monkeypatch.setattr(paper_report, "cross_check", fake)
    monkeypatch.setattr("testbed.experiments.run.git_revision", lambda: "abc1234+dirty")


def test_how_the_sweep_ran_follows_its_record(tmp_path: Path) -> None:
    text = _report(tmp_path, jobs=3)
    meta = json.loads((tmp_path / "sweep.json").read_text())
    assert meta["jobs"] == 3 and meta["revision"] == "abc1234+dirty" and meta["cpus"] == os.cpu_count()
    assert meta["sources"] == paper_report.sources() and "testbed.analytic.simulate" in meta["sources"]  # stamped by the sweep
    assert "revision `abc1234+dirty`" in text
    assert "3 worker processes" in text and f"{os.cpu_count()} CPU" in text and "42 s wall time" in text
    assert ".venv/bin/python -m runners.sweep paper --quick" in text
    assert "1 worker process)" in _report(tmp_path, jobs=1)
    # the sweep passes the revision it took before writing its CSVs (they would make it dirty)
    paper_report.write_report(tmp_path, wall_s=1.0, check=False, jobs=1, revision="fedcba9")
    assert "revision `fedcba9`" in (tmp_path / "README.md").read_text()
    for fixed in ("2 cores", "far from its published", "Why"):
        assert fixed not in text


def test_the_cross_check_sentence_follows_whether_it_ran(tmp_path: Path) -> None:
    off = _report(tmp_path, check=False)
    assert "No emulator cross-check ran" in off and "## Cross-check" not in off
    on = _report(tmp_path, check=True)
    assert "No emulator cross-check ran" not in on and "## Cross-check" in on
    assert "On 2 cross-check runs with background load" in on
    assert "at most 1.23 %" in on and "2 of 2 generated the reference tokens" in on
    assert "7 tokens, interval 1" in on and "2 small instances of 3 and 4 devices" in on
    assert "background load (up to 29.0 %" in on and "by up to 25 % within a run" in on
    assert "Migrations per run (analytic/emulated): 0/0, 2/2." in on


def test_verdicts_follow_the_numbers(tmp_path: Path) -> None:
    good = _report(tmp_path, ls_ratio=1.0, ra_ratio=1.17, ls_speedup=2.5)
    assert "worst mean ratio 1.000 (target <= 1.05), worst p95 1.000 (target <= 1.15): **met**" in good
    assert "1.17 at 3 devices (within)" in good
    assert "Measured speed-ups 2.50, oom 0: **met**" in good
    bad = _report(tmp_path, ls_ratio=1.3, ra_ratio=3.0, ls_speedup=1.1)
    assert "worst mean ratio 1.300 (target <= 1.05), worst p95 1.300 (target <= 1.15): **not met**" in bad
    assert "3.00 at 3 devices (above)" in bad and "3.00 at 4 devices (above)" in bad
    assert "Measured speed-ups 1.10, oom 0: **not met**" in bad
    assert "0.90 at 3 devices (below)" in _report(tmp_path, ra_ratio=0.9)
    assert "furthest" not in good  # every model at the same ratio: nothing to single out


def test_what_the_runs_were_follows_the_rows(tmp_path: Path) -> None:
    text = _report(tmp_path)
    assert "## (a) 3 and 4 devices" in text and "16 generated tokens per run, 4 instances" in text
    assert "## (b) 25 devices" in text and "Up to 40 generated tokens, re-planning every 4 tokens" in text
    assert "2 instances each of gpt2-small on 25 devices" in text
    assert "drawn here: 4 small, 2 large" in text
    assert "resource_aware_ls 12.5" in text  # decision time from timing.csv


def test_the_report_command_rebuilds_from_the_csvs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from runners import paper_report as report

    assert report.main([str(tmp_path / "empty"), "--no-check"]) == 2
    assert "no optimality.csv or scale.csv" in capsys.readouterr().err
    _report(tmp_path)
    (tmp_path / "README.md").unlink()
    assert report.main([str(tmp_path), "--no-check"]) == 0
    assert "No emulator cross-check ran" in (tmp_path / "README.md").read_text()
