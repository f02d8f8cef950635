"""The command line `python -m runners.run`: bad input ends with
exit status 2, one line on stderr naming the file and key path, no traceback and no run
directory; a short run writes every result file; two algorithms give two run directories
and a comparison table; a failed run exits 1 and leaves readable partial results.

Bad input is checked twice: in process (`runners.run.main`) for every case, and end to end
in a real subprocess for a representative subset. The subprocesses (each pays the torch
import) run in parallel, once per module, so the file stays well under a minute.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from runners import run as cli
from testbed import scenario as sc

sys.path.insert(0, str(Path(__file__).parent))
from bad_scenarios import BAD_SCENARIOS, LIMIT_SCENARIOS, VALID  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "scenarios"
TIMEOUT_S = 60

# the result format: columns may be added after these, never renamed or removed
TOKENS_COLS = ["token", "t_start_s", "latency_ms", "predicted_ms", "stall_ms", "migrations",
               "migrated_bytes", "token_id", "ref_token_id"]
EVENTS_COLS = ["t_s", "token", "kind", "subject", "detail"]
PLACEMENTS_COLS = ["token", "block", "device"]
TELEMETRY_COLS = ["t_s", "token", "device", "mem_current", "mem_high", "mem_max", "kv_bytes",
                  "weights_bytes", "pressure_bytes", "compute_gflops"]
LINKS_COLS = ["t_s", "token", "src", "dst", "bandwidth_mbps", "measured_mbps", "latency_ms", "bytes"]


# ---------------------------------------------------------------------------- bad input cases


@dataclass(frozen=True)
class BadCase:
    """One bad invocation: the scenario file to write (None: `make` builds the path), extra
    command-line arguments, and the substring the one-line error must contain."""

    id: str
    text: str | bytes | None
    args: tuple[str, ...]
    expect: str
    kind: str = "file"  # file | missing | directory

    def path_in(self, d: Path) -> Path:
        """Create the input in directory d; returns the scenario path to pass."""
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{self.id}.yaml"
        if self.kind == "missing":
            return p
        if self.kind == "directory":
            p.mkdir()
            return p
        if isinstance(self.text, bytes):
            p.write_bytes(self.text)
        else:
            assert self.text is not None
            p.write_text(self.text, encoding="utf-8")
        return p


SPECIAL_CASES = [
    BadCase("missing_file", None, (), "no such file", kind="missing"),
    BadCase("directory", None, (), "is a directory", kind="directory"),
    BadCase("not_yaml", "version: 1\nname: [bad\n  devices: {{{\n", (), "not valid YAML"),
    BadCase("unknown_algorithm_option", VALID, ("--algorithm", "magic"), "--algorithm"),
    BadCase("duplicate_algorithm", VALID, ("--algorithm", "static,greedy,static"), "--algorithm"),
    BadCase("zero_tokens", VALID, ("--tokens", "0"), "--tokens"),
    BadCase("negative_seed_option", VALID, ("--seed", "-1"), "--seed"),
    # the harness runs with --clock virtual, which only the in-process transport supports
    BadCase("ws_needs_real_clock", VALID, ("--transport", "ws"), "--transport"),
]
# more file-level cases, checked in process only
EXTRA_CASES = [
    BadCase("not_a_mapping", "just some words, not a scenario\n", (), "top level must be a mapping"),
    BadCase("binary_file", b"\x89PNG\r\n\x1a\n\x00\xff\xfe", (), "not UTF-8"),
    BadCase("unknown_second_algorithm", VALID, ("--algorithm", "static,magic"), "--algorithm"),
]

TABLE_CASES = [BadCase(id_, text, (), path) for id_, text, path in BAD_SCENARIOS + LIMIT_SCENARIOS]
ALL_CASES = TABLE_CASES + SPECIAL_CASES + EXTRA_CASES

# the subprocess subset: one or two of each family in bad_scenarios.py, plus SPECIAL_CASES
SUBPROCESS_TABLE_IDS = [
    "unknown_top_level_key", "unknown_device_key", "missing_version", "version_as_string",
    "events_not_a_list", "string_for_number", "bool_for_int", "nan_compute", "zero_memory",
    "duplicate_device_names", "unknown_device_in_link", "unknown_algorithm",
    "model_fits_nowhere", "longer_than_context", "at_token_beyond_run", "join_link_to_unknown",
    "background_negative_in_series",
    # every class of absurd input: refused end to end, fast
    *(id_ for id_, _, _ in LIMIT_SCENARIOS),
]
_BY_ID = {c.id: c for c in ALL_CASES}
SUBPROCESS_CASES = [_BY_ID[i] for i in SUBPROCESS_TABLE_IDS] + SPECIAL_CASES


def test_case_table_is_sane() -> None:
    assert len(_BY_ID) == len(ALL_CASES), "duplicate case ids"
    assert set(SUBPROCESS_TABLE_IDS) <= {c.id for c in TABLE_CASES}


def _assert_bad_input(case: BadCase, path: Path, out_dir: Path, status: int, stdout: str,
                      stderr: str) -> None:
    shown = f"exit {status}\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}"
    assert status == 2, shown
    assert "Traceback" not in stdout and "Traceback" not in stderr, shown
    line = stderr.rstrip("\n")
    assert line and "\n" not in line and "\r" not in line, f"not exactly one line:\n{shown}"
    assert str(path) in line, f"the error does not name the file {path}:\n{shown}"
    assert case.expect in line, f"expected {case.expect!r} in the error:\n{shown}"
    # no run directory: --out is absent or empty
    assert not out_dir.exists() or not any(out_dir.iterdir()), sorted(out_dir.rglob("*"))


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_bad_input_in_process(case: BadCase, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = case.path_in(tmp_path / "in")
    out_dir = tmp_path / "out"
    status = cli.main([str(path), "--out", str(out_dir), "--clock", "virtual", *case.args])
    got = capsys.readouterr()
    _assert_bad_input(case, path, out_dir, status, got.out, got.err)


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Every subprocess case, run in parallel once: id -> (path, out_dir, status, stdout, stderr)."""
    base = tmp_path_factory.mktemp("cli")

    def one(case: BadCase) -> tuple:
        path = case.path_in(base / case.id / "in")
        out_dir = base / case.id / "out"
        cmd = [sys.executable, "-m", "runners.run", str(path), "--out", str(out_dir),
               "--clock", "virtual", *case.args]
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            return path, out_dir, None, str(e.stdout), str(e.stderr)
        return path, out_dir, p.returncode, p.stdout, p.stderr

    workers = max(2, min(4, os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, SUBPROCESS_CASES))
    return {c.id: r for c, r in zip(SUBPROCESS_CASES, results, strict=True)}


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[c.id for c in SUBPROCESS_CASES])
def test_bad_input_subprocess(case: BadCase, subprocess_results: dict[str, tuple]) -> None:
    path, out_dir, status, stdout, stderr = subprocess_results[case.id]
    assert status is not None, f"timed out after {TIMEOUT_S} s\n{stdout}\n{stderr}"
    _assert_bad_input(case, path, out_dir, status, stdout, stderr)


# ---------------------------------------------------------------------------- helpers


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*/*") if p.is_dir())


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ---------------------------------------------------------------------------- a short run


def test_short_run_writes_every_result_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scen_file = SCENARIOS / "steady.yaml"
    scen = sc.load(scen_file)
    out = tmp_path / "results"
    status = cli.main([str(scen_file), "--clock", "virtual", "--tokens", "6", "--out", str(out), "--quiet"])
    got = capsys.readouterr()
    assert status == 0, got
    assert "Traceback" not in got.out + got.err

    dirs = _run_dirs(out)
    assert len(dirs) == 1, dirs
    run_dir = dirs[0]
    assert run_dir.parent == out / scen.name
    algorithm = scen.controller.algorithm
    assert run_dir.name.endswith(f"-{algorithm}-s{scen.seed}"), run_dir.name
    lines = got.out.splitlines()
    assert len(lines) == 1 and str(run_dir) in lines[0], got.out  # one line per run, the path

    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "completed"
    assert meta["algorithm"] == algorithm
    assert meta["seed"] == scen.seed
    assert meta["clock"] == "virtual"
    assert isinstance(meta["git_revision"], str) and meta["git_revision"]
    assert meta["python"] == platform.python_version()
    assert meta["torch"] == torch.__version__
    assert meta["scenario"]["name"] == "steady"
    assert meta["scenario"]["generation"]["new_tokens"] == 6  # the resolved scenario, with overrides

    s = json.loads((run_dir / "summary.json").read_text())
    assert s["tokens"] == 6
    assert set(s["latency_ms"]) >= {"mean", "p50", "p95", "p99", "max"}
    assert all(_finite(s["latency_ms"][k]) and s["latency_ms"][k] > 0 for k in ("mean", "p50", "p95", "p99", "max"))
    assert s["latency_ms"]["p50"] <= s["latency_ms"]["p95"] <= s["latency_ms"]["p99"] <= s["latency_ms"]["max"]
    assert _finite(s["total_s"]) and s["total_s"] > 0
    for k in ("stall_ms", "migrations", "migrated_bytes", "oom", "replans", "overrun_fraction"):
        assert _finite(s[k]) and s[k] >= 0, (k, s[k])
    assert s["oom"] == 0
    assert set(s["decision_ms"]) >= {"mean", "max"}
    assert all(_finite(s["decision_ms"][k]) for k in ("mean", "max"))
    assert 0 <= s["overrun_fraction"] <= 1
    assert set(s["peak_memory_bytes"]) == {d.name for d in scen.devices}
    assert all(isinstance(v, int) and v >= 0 for v in s["peak_memory_bytes"].values())
    assert s["correctness"]["tokens_match"] is True
    assert s["correctness"]["max_abs_logit_diff"] <= 1e-4

    cols, rows = _read_csv(run_dir / "tokens.csv")
    assert cols[: len(TOKENS_COLS)] == TOKENS_COLS, cols
    assert len(rows) == 6
    assert [int(r["token"]) for r in rows] == list(range(6))
    assert all(r["token_id"] == r["ref_token_id"] for r in rows)

    cols, _ = _read_csv(run_dir / "events.csv")
    assert cols[: len(EVENTS_COLS)] == EVENTS_COLS, cols

    cols, rows = _read_csv(run_dir / "placements.csv")
    assert cols[: len(PLACEMENTS_COLS)] == PLACEMENTS_COLS, cols
    m = scen.model
    blocks = [f"head.{l}.{h}" for l in range(m.layers) for h in range(m.heads)]
    blocks += [f"proj.{l}" for l in range(m.layers)] + [f"ffn.{l}" for l in range(m.layers)]
    initial = [r for r in rows if r["token"] == "0"]
    assert sorted(r["block"] for r in initial) == sorted(blocks)  # each block exactly once
    hosts = {d.name for d in scen.devices if d.host_blocks}
    assert all(r["device"] in hosts for r in initial)
    for device in {r["device"] for r in initial}:  # a device holding blocks used memory
        assert s["peak_memory_bytes"][device] > 0, (device, s["peak_memory_bytes"])

    cols, rows = _read_csv(run_dir / "telemetry.csv")
    assert cols[: len(TELEMETRY_COLS)] == TELEMETRY_COLS, cols
    assert {r["device"] for r in rows} == {d.name for d in scen.devices}

    cols, _ = _read_csv(run_dir / "links.csv")
    assert cols[: len(LINKS_COLS)] == LINKS_COLS, cols


def test_two_algorithms_write_two_runs_and_a_comparison(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    status = cli.main([str(SCENARIOS / "steady.yaml"), "--algorithm", "static,greedy", "--clock", "virtual",
                       "--tokens", "4", "--out", str(out)])
    got = capsys.readouterr()
    assert status == 0, got
    assert "Traceback" not in got.out + got.err
    dirs = _run_dirs(out)
    assert sorted(d.name.split("-", 1)[1] for d in dirs) == ["greedy-s0", "static-s0"], dirs
    for d in dirs:
        meta = json.loads((d / "meta.json").read_text())
        assert meta["status"] == "completed"
        assert meta["algorithm"] == d.name.split("-")[1]
        assert (d / "summary.json").is_file()
    # the comparison table comes after both summaries and has a row per algorithm
    lines = got.out.splitlines()
    title = [i for i, line in enumerate(lines) if "per-token latency by algorithm" in line]
    assert title, got.out
    table = lines[title[-1]:]
    for name in ("static", "greedy"):
        assert any(name in line and "completed" in line for line in table), (name, got.out)


# ---------------------------------------------------------------------------- a failed run


def test_failed_run_exits_1_with_partial_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # memory_pressure, but the co-tenant takes all of the device's free memory before token
    # 2; the static placement puts heads there and never re-plans, so the device's K/V
    # caches cannot grow and the run fails at token 2
    data = yaml.safe_load((SCENARIOS / "memory_pressure.yaml").read_text())
    (ev,) = data["events"]
    assert ev["action"] == "memory_pressure"
    ev["at_token"] = 2
    ev["take_mib"] = 64  # more than the device has: it takes everything that is free
    scen_file = tmp_path / "early_pressure.yaml"
    scen_file.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "results"
    status = cli.main([str(scen_file), "--algorithm", "static", "--clock", "virtual", "--tokens", "6",
                       "--out", str(out), "--quiet"])
    got = capsys.readouterr()
    assert "Traceback" not in got.out + got.err
    dirs = _run_dirs(out)
    assert len(dirs) == 1, dirs
    run_dir = dirs[0]

    _, placed = _read_csv(run_dir / "placements.csv")
    heads_on = {r["device"] for r in placed if r["token"] == "0" and r["block"].startswith("head.")}
    assert ev["device"] in heads_on, f"precondition: static puts no head on {ev['device']}"

    assert status == 1, got
    lines = got.out.splitlines()
    assert len(lines) == 1 and str(run_dir) in lines[0], got.out
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"].startswith("failed: "), meta["status"]
    assert "memory" in meta["status"], meta["status"]
    assert meta["end"]
    assert not (run_dir / "error.log").exists(), (run_dir / "error.log").read_text()  # not a bug

    s = json.loads((run_dir / "summary.json").read_text())
    cols, rows = _read_csv(run_dir / "tokens.csv")
    assert cols[: len(TOKENS_COLS)] == TOKENS_COLS
    assert [int(r["token"]) for r in rows] == list(range(ev["at_token"]))  # all rows before the failure
    assert all(r["token_id"] == r["ref_token_id"] for r in rows)
    assert s["tokens"] == len(rows)
    assert s["oom"] >= 1
    assert s["correctness"]["tokens_match"] is False  # the run is incomplete
    _, events = _read_csv(run_dir / "events.csv")
    assert any(e["kind"] == "memory_pressure" for e in events)
    assert any(e["kind"] == "oom" for e in events)


# ---------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_on_an_in_process_run_is_one_line_and_exit_130(tmp_path: Path) -> None:
    """Ctrl-C mid-run with the agents in the runner's process (the default; tests/test_ws.py
    covers --processes): the run's files are written (status `failed: interrupted`), stderr
    is one line (no traceback), exit 130."""
    out = tmp_path / "results"
    # a fixed time scale (no calibration pilot) slow enough that the run is still going
    runner = subprocess.Popen([sys.executable, "-m", "runners.run", str(SCENARIOS / "steady.yaml"),
                               "--tokens", "200", "--time-scale", "20", "--out", str(out), "--quiet"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and runner.poll() is None:
            dirs = _run_dirs(out)
            if dirs and len(_read_csv(dirs[0] / "tokens.csv")[1]) >= 2:
                break
            time.sleep(0.2)
        assert runner.poll() is None, f"the run ended before it was interrupted: {runner.returncode}"
        runner.send_signal(signal.SIGINT)
        _, err = runner.communicate(timeout=TIMEOUT_S)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    (run_dir,) = _run_dirs(out)
    assert runner.returncode == 130, err
    assert err.strip() == f"interrupted: results in {run_dir}", err
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "failed: interrupted" and meta["end"], meta["status"]
    assert 2 <= len(_read_csv(run_dir / "tokens.csv")[1]) < 200
