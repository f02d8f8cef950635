"""The sweep's analytic mode agrees with the emulator; instances are reproducible; the
command line writes its CSVs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from runners import sweep as cli
from testbed import experiment
from testbed.placement.registry import get_algorithm
from testbed.scenario import parse
from testbed.sweep import instance_to_scenario, make_instance, simulate

from .conftest import read_csv


def test_instances_are_reproducible_and_in_the_papers_ranges() -> None:
    a = make_instance("paper-small", 5, 10, np.random.default_rng(3))
    b = make_instance("paper-small", 5, 10, np.random.default_rng(3))
    assert np.array_equal(a.memory, b.memory) and np.array_equal(a.load, b.load)
    assert ((a.memory >= 2e9) & (a.memory <= 16e9)).all() and ((a.flops >= 1e10) & (a.flops <= 1e11)).all()
    assert (a.load >= 0).all() and (a.load <= 0.3).all() and 16 <= a.prompt <= 128
    off = a.rate[~np.eye(5, dtype=bool)] * 8
    lo, hi = {"small": (0.1e9, 0.5e9), "large": (1e9, 40e9)}[a.bandwidth_class]
    assert ((off >= lo) & (off <= hi)).all()


def test_analytic_mode_matches_the_emulator(tmp_path: Path) -> None:
    inst = make_instance("paper-small", 4, 8, np.random.default_rng(11), ident="x", max_load=0.0, prompt=(16, 24))
    for alg in ("resource_aware", "resource_aware_ls"):
        ana = simulate(inst, get_algorithm(alg), interval=1)
        prep = experiment.prepare(parse(instance_to_scenario(inst, alg), "<x>"))
        o = experiment.run(prep, alg, tmp_path / alg, clock="virtual")
        emu = [float(r["latency_ms"]) for r in read_csv(o.run_dir / "tokens.csv") if r["phase"] == "decode"]
        assert len(emu) == inst.tokens
        assert max(abs(x - y) / y for x, y in zip(ana.latency_ms, emu, strict=True)) < 0.02


def test_quick_sweep_writes_its_csvs(tmp_path: Path) -> None:
    args = ["optimality", "--quick", "--instances", "2", "--algorithms", "resource_aware,resource_aware_ls,greedy"]
    assert cli.main([*args, "--jobs", "1", "--out", str(tmp_path)]) == 0
    assert cli.main([*args, "--jobs", "2", "--out", str(tmp_path / "again")]) == 0
    for name in ("optimality.csv", "optimality_summary.csv"):  # the same bytes, however it ran
        assert (tmp_path / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    timing = list(csv.DictReader(open(tmp_path / "timing.csv")))
    assert len(timing) == 3 * 2 * 4 and all(float(t["decision_ms_mean"]) > 0 for t in timing)
    rows = list(csv.DictReader(open(tmp_path / "optimality.csv")))
    assert not {"decision_ms_mean", "wall_s"} & set(rows[0])  # wall clock only in timing.csv
    assert {r["algorithm"] for r in rows} == {"optimal", "resource_aware", "resource_aware_ls", "greedy"}
    assert len(rows) == 3 * 2 * 4 and {r["mode"] for r in rows} == {"analytic"}
    opt = [r for r in rows if r["algorithm"] == "optimal"]
    assert all(float(r["ratio_to_optimal"]) == 1.0 for r in opt)
    assert (tmp_path / "optimality_summary.csv").exists()
