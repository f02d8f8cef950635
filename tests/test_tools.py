"""The analysis tools (tools.latency, tools.plot, tools.compare, testbed.results.read) on real run
directories: two bandwidth_drop runs (40 tokens) and a memory_pressure `static` run that
fails part-way (its pressure moved to token 6, so pi-b runs out at token 22)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from testbed.experiments import run as experiment
from testbed.results.read import RunsError, find_runs, load_runs, run_stats
from testbed.scenario import load, parse
from tools import compare, latency, plot

TOKENS = 40


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    bw = load("scenarios/bandwidth_drop.yaml").with_overrides(new_tokens=TOKENS)
    prep = experiment.prepare(bw)
    for alg in ("static", "resource_aware"):
        out = experiment.run(prep, alg, root / "bandwidth_drop" / f"run-{alg}", clock="virtual")
        assert out.ok, out.status
    mp = load("scenarios/memory_pressure.yaml").to_dict()
    mp["generation"]["new_tokens"] = TOKENS
    mp["events"] = [{"at_token": 6, "action": "memory_pressure", "device": "pi-b", "take_mib": 2.44}]
    prep = experiment.prepare(parse(mp, "scenarios/memory_pressure.yaml"))
    out = experiment.run(prep, "static", root / "memory_pressure" / "run-static", clock="virtual")
    assert out.status.startswith("failed: out of memory"), out.status
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("tokens.csv"))


def by_key(rows: list[dict[str, str]]) -> dict[tuple[str, str], dict[str, str]]:
    return {(r["scenario"], r["algorithm"]): r for r in rows}


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


# ---------------------------------------------------------------------------- runs.py


def test_find_runs_from_parents_and_run_dirs(runs_root: Path) -> None:
    dirs = run_dirs(runs_root)
    assert len(dirs) == 3
    assert find_runs([runs_root]) == dirs
    # a run directory itself, a parent, and the same run twice: each run once, sorted
    assert find_runs([dirs[2], runs_root / "bandwidth_drop", dirs[0]]) == dirs
    assert [r.algorithm for r in load_runs([runs_root])] == ["resource_aware", "static", "static"]


def test_find_runs_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(RunsError, match="no such file"):
        find_runs([tmp_path / "missing"])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(RunsError, match="no run directory"):
        find_runs([tmp_path / "empty"])


# ---------------------------------------------------------------------------- latency


def test_latency_rows_are_tagged_copies_of_tokens_csv(runs_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "lat.csv"
    assert latency.main([str(runs_root), "-o", str(out)]) == 0
    rows = read_csv(out)
    with open(out) as f:
        header = f.readline().strip().split(",")
    dirs = run_dirs(runs_root)
    tok_header = read_csv(dirs[0] / "tokens.csv")[0].keys()
    assert header == ["scenario", "algorithm", "seed", "clock", "run_dir", "status", *tok_header]
    expected = sum(len(read_csv(d / "tokens.csv")) for d in dirs)
    assert len(rows) == expected == TOKENS + TOKENS + 22
    for d in dirs:
        meta = json.loads((d / "meta.json").read_text())
        mine = [r for r in rows if r["run_dir"] == str(d)]
        assert [{k: r[k] for k in tok_header} for r in mine] == read_csv(d / "tokens.csv")
        assert {(r["scenario"], r["algorithm"], r["seed"], r["clock"], r["status"]) for r in mine} == {
            (meta["scenario"]["name"], meta["algorithm"], str(meta["seed"]), "virtual", meta["status"])}
    keys = [(r["scenario"], r["algorithm"], r["run_dir"], int(r["token"])) for r in rows]
    assert keys == sorted(keys)
    assert {r["status"] for r in rows if r["scenario"] == "memory_pressure"} == {
        json.loads((dirs[2] / "meta.json").read_text())["status"]}
    # the summary defaults to <stem>_summary.csv beside -o; output is deterministic
    first = out.read_bytes(), (tmp_path / "lat_summary.csv").read_bytes()
    assert latency.main([str(d) for d in reversed(dirs)] + ["-o", str(out)]) == 0
    assert (out.read_bytes(), (tmp_path / "lat_summary.csv").read_bytes()) == first


def test_latency_summary_statistics_by_hand(runs_root: Path, tmp_path: Path) -> None:
    out, summ = tmp_path / "lat.csv", tmp_path / "s" / "summary.csv"
    assert latency.main([str(runs_root), "-o", str(out), "--summary", str(summ)]) == 0
    rows = by_key(read_csv(summ))
    assert len(rows) == 3
    assert list(read_csv(summ)[0])[:5] == ["scenario", "algorithm", "seed", "clock", "status"]
    for d in run_dirs(runs_root):
        meta = json.loads((d / "meta.json").read_text())
        row = rows[(meta["scenario"]["name"], meta["algorithm"])]
        toks = read_csv(d / "tokens.csv")
        events = read_csv(d / "events.csv")
        lat = np.array([float(t["latency_ms"]) for t in toks if t["phase"] == "decode"])
        assert int(row["tokens"]) == len(toks)
        for col, want in (("latency_p50_ms", np.percentile(lat, 50)), ("latency_p95_ms", np.percentile(lat, 95)),
                          ("latency_p99_ms", np.percentile(lat, 99)), ("latency_mean_ms", lat.mean()),
                          ("latency_max_ms", lat.max()), ("prefill_ms", float(toks[0]["latency_ms"])),
                          ("stall_ms", sum(float(t["stall_ms"]) for t in toks))):
            assert float(row[col]) == pytest.approx(want, rel=1e-7, abs=1e-9), col
        assert int(row["migrations"]) == sum(int(t["migrations"]) for t in toks)
        assert int(row["migrated_bytes"]) == sum(int(t["migrated_bytes"]) for t in toks)
        assert int(row["oom"]) == sum(e["kind"] == "oom" for e in events)
        assert int(row["replans"]) == sum(e["kind"] == "replan" for e in events)
        assert row["status"] == meta["status"]
        # agrees with the summary.json the run wrote
        s = json.loads((d / "summary.json").read_text())
        assert float(row["latency_p95_ms"]) == pytest.approx(s["latency_ms"]["p95"], rel=1e-7)
        assert (row["oom"], row["replans"]) == (str(s["oom"]), str(s["replans"]))
        assert row["tokens_match"] == ("1" if s["correctness"]["tokens_match"] else "0")
    failed = rows[("memory_pressure", "static")]
    assert failed["status"].startswith("failed") and failed["tokens"] == "22"
    assert (failed["oom"], failed["tokens_match"]) == ("1", "0")
    assert int(rows[("bandwidth_drop", "resource_aware")]["migrations"]) > 0
    assert rows[("bandwidth_drop", "static")]["tokens_match"] == "1"


def test_partial_run_without_summary(runs_root: Path, tmp_path: Path) -> None:
    """A run killed mid-write: no summary.json, tokens.csv ends in half a row."""
    src = run_dirs(runs_root)[0]
    run = tmp_path / "crashed"
    shutil.copytree(src, run)
    (run / "summary.json").unlink()
    text = (run / "tokens.csv").read_text().splitlines(keepends=True)
    (run / "tokens.csv").write_text("".join(text[:11]) + text[11][:12])
    out = tmp_path / "lat.csv"
    assert latency.main([str(run), "-o", str(out)]) == 0
    assert len(read_csv(out)) == 10
    stats = run_stats(load_runs([run])[0])
    assert stats["tokens"] == 10 and not stats["tokens_match"]


def test_latency_bad_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "missing", tmp_path / "empty"):
        assert latency.main([str(path), "-o", str(tmp_path / "x.csv")]) == 2
        assert str(path) in one_error_line(capsys)
    assert not (tmp_path / "x.csv").exists()


# ---------------------------------------------------------------------------- plot


def test_plot_writes_png(runs_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "fig.png"
    assert plot.main([str(runs_root / "bandwidth_drop"), "-o", str(out), "--dpi", "80"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_plot_figure_contents(runs_root: Path) -> None:
    runs = load_runs([runs_root / "bandwidth_drop"])
    fig = plot.make_figure(runs, plot.select_panels(runs, ["resource_aware"]), None)
    try:
        assert "bandwidth_drop" in fig.get_suptitle()
        top, panel = fig.axes  # the latency panel and one placement panel
        assert top.get_ylabel() == "latency per token (ms)"
        legend = [t.get_text() for t in top.get_legend().get_texts()]
        assert any(t.startswith("static") for t in legend) and any(t.startswith("resource_aware") for t in legend)
        assert any("Mbit/s" in t.get_text() for t in top.texts)  # the set_link event is labelled
        assert any("moved" in t.get_text() for t in top.texts)  # resource_aware's migration
        devices = [t.get_text() for t in panel.get_legend().get_texts()]
        assert devices == ["gateway", "pi-a", "pi-b", "phone"]
        assert [t.get_text() for t in panel.get_yticklabels()] == [f"layer {i}" for i in range(4)]
    finally:
        plot.plt.close(fig)


def test_placement_matrix_follows_placements_csv(runs_root: Path) -> None:
    run = next(r for r in load_runs([runs_root]) if r.algorithm == "resource_aware")
    devices = run.devices()
    blocks, m = plot.placement_matrix(run, devices, TOKENS)
    rows = read_csv(run.path / "placements.csv")
    assert len(blocks) == 40 and blocks[:10] == [*(f"head.0.{h}" for h in range(8)), "proj.0", "ffn.0"]
    final = {}
    for r in rows:
        if int(r["token"]) == 0:
            assert devices[m[blocks.index(r["block"]), 0]] == r["device"]
        final[r["block"]] = r["device"]
    assert [devices[i] for i in m[:, -1]] == [final[b] for b in blocks]
    moved_at = {int(r["token"]) for r in rows} - {0}
    assert moved_at and all((m[:, t] != m[:, t - 1]).any() for t in moved_at)


def test_plot_bad_input_exits_2(runs_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plot.main([str(tmp_path / "missing"), "-o", str(tmp_path / "f.png")]) == 2
    one_error_line(capsys)
    assert plot.main([str(runs_root), "-o", str(tmp_path / "f.png"), "--placement", "nope"]) == 2
    assert "nope" in one_error_line(capsys)
    assert not (tmp_path / "f.png").exists()


# ---------------------------------------------------------------------------- compare


def test_compare_lists_every_run(runs_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp.csv"
    assert compare.main([str(runs_root), "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.index("bandwidth_drop") < text.index("memory_pressure")
    assert "failed: out of memory" in text and "tokens 1-23" in text and "tokens 24-39" in text
    assert text.count("completed") == 2
    rows = read_csv(out)
    assert [(r["scenario"], r["algorithm"]) for r in rows] == [
        ("bandwidth_drop", "resource_aware"), ("bandwidth_drop", "static"), ("memory_pressure", "static")]
    for r in rows:
        toks = read_csv(Path(r["run_dir"]) / "tokens.csv")
        lat = {int(t["token"]): float(t["latency_ms"]) for t in toks}
        if r["scenario"] == "bandwidth_drop":
            assert float(r["mean_ms_tokens_1_23"]) == pytest.approx(np.mean([lat[k] for k in range(1, 24)]))
            assert float(r["mean_ms_tokens_24_39"]) == pytest.approx(np.mean([lat[k] for k in range(24, 40)]))
            assert r["mean_ms_tokens_1_5"] == ""
        else:  # cut at the pressure (token 6); the run ended at token 21
            assert float(r["mean_ms_tokens_6_21"]) == pytest.approx(np.mean([lat[k] for k in range(6, 22)]))
            assert r["tokens_match"] == "0"


def test_compare_bad_path_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert compare.main([str(tmp_path)]) == 2
    assert "no run directory" in one_error_line(capsys)


def test_identical_runs_are_told_apart(runs_root: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    src = next(d for d in run_dirs(runs_root) if d.name == "run-static" and "bandwidth" in str(d))
    shutil.copytree(src, tmp_path / "again")
    assert compare.main([str(src), str(tmp_path / "again")]) == 0
    text = capsys.readouterr().out
    assert "static [run-static]" in text and "static [again]" in text


# ---------------------------------------------------------------------------- hostile run directories


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One completed six-token run (gpt-tiny, virtual clock): what hostile copies start from."""
    from .conftest import make_scenario, run_virtual

    out = tmp_path_factory.mktemp("small")
    assert run_virtual(make_scenario(new_tokens=6), "resource_aware", out).ok
    (run,) = out.iterdir()
    return run


# every tool that reads run directories, as the child process below calls it
_TOOLS_SCRIPT = """
import contextlib, io, json, sys, time
from tools import compare, latency, plot, report, view
out = sys.argv[1]
calls = {
    "report": lambda d: report.main([d, "-o", out + "/r.html"]),
    "compare": lambda d: compare.main([d]),
    "latency": lambda d: latency.main([d, "-o", out + "/l.csv"]),
    "plot": lambda d: plot.main([d, "-o", out + "/p.png", "--dpi", "40"]),
    "view": lambda d: view.load_feed([d], "view") and 0,
}
for d in sys.argv[2:]:
    for name, call in calls.items():
        err, t = io.StringIO(), time.monotonic()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = call(d)
            except Exception as e:
                code = repr(e)
        print(json.dumps([d, name, code, err.getvalue(), time.monotonic() - t]), flush=True)
"""


# the files of a run directory each tool reads (report and view: all)
RESULT_FILES = ("meta.json", "summary.json", "tokens.csv", "events.csv", "placements.csv", "telemetry.csv",
                "links.csv")
_READS = {"compare": ("meta.json", "tokens.csv", "events.csv"), "latency": ("meta.json", "tokens.csv", "events.csv"),
          "plot": ("meta.json", "tokens.csv", "events.csv", "placements.csv")}


def _run_tools(dirs: list[Path], out: Path) -> list[list]:
    """Each tool on each directory in one child process, within a time limit: a tool that
    blocks on a FIFO or reads /dev/zero fails this test instead of hanging it."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _TOOLS_SCRIPT, str(out), *map(str, dirs)],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in res.stdout.splitlines()]


def test_hostile_run_directories_are_refused_with_one_line(small_run: Path, tmp_path: Path) -> None:
    """/dev/zero, FIFOs, a link out of the directory, markup or text in number columns, bytes
    that are not UTF-8, a 128 KiB field: every tool that reads the file exits 2 with the
    same one line naming the file (and row and column), in well under a second each
    (compare, latency and plot read only some of the files)."""
    from .hostile_runs import refused_copies

    cases = refused_copies(small_run, tmp_path / "cases")
    (tmp_path / "out").mkdir()
    results = _run_tools([d for d, _ in cases.values()], tmp_path / "out")
    assert len(results) == 5 * len(cases)
    expect = {str(d): message for d, message in cases.values()}
    for d, tool, code, err, seconds in results:
        lines = err.strip().splitlines()
        file = expect[d][len(d) + 1:].split(":")[0]
        if file not in _READS.get(tool, RESULT_FILES):
            assert (code, err) == (0, ""), (d, tool)  # a file this tool does not read
            continue
        view_ok = tool == "view" and code.startswith("RunsError(")  # load_feed raises; main prints
        assert code == 2 or view_ok, (d, tool, code, err)
        if tool != "view":
            assert len(lines) == 1 and lines[0].startswith(f"error: {expect[d]}"), (tool, err)
        else:
            assert f"{d}/{file}:" in code, code
        assert seconds < 5, (d, tool, seconds)
    assert not (tmp_path / "out" / "r.html").exists()  # report refuses every case


def test_infinite_latencies_are_numbers(small_run: Path, tmp_path: Path) -> None:
    """inf and -inf in float columns are read as numbers: the statistics keep them, the page
    gets null for them (JSON has no infinity), and plot draws inf cut at the top."""
    from .hostile_runs import infinite_copy

    run = infinite_copy(small_run, tmp_path / "inf")
    (loaded,) = load_runs([run])
    assert loaded.tokens[2]["latency_ms"] == np.inf and loaded.tokens[3]["predicted_ms"] == -np.inf
    assert run_stats(loaded)["latency_max_ms"] == np.inf
    (tmp_path / "out").mkdir()
    results = _run_tools([run], tmp_path / "out")
    assert {tool: code for _, tool, code, _, _ in results} == {t: 0 for t in ("report", "compare", "latency",
                                                                             "plot", "view")}
    top, cut = plot._ylimit([loaded], None)
    assert cut and np.isfinite(top)


def test_run_files_must_stay_inside_the_run_directory(small_run: Path, tmp_path: Path) -> None:
    """A link inside the run directory is read; a link that leaves it, however it is spelled,
    is refused; a link loop is one line."""
    from testbed.results.read import read_csv as runs_read_csv
    from testbed.results.read import read_text

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    (run / "copy.csv").write_text("a\n1\n")
    (run / "inside.csv").symlink_to("copy.csv")
    assert runs_read_csv(run / "inside.csv") == (["a"], [{"a": "1"}])
    (run / "sub").mkdir()
    (run / "up.csv").symlink_to("sub/../../run/copy.csv")
    assert read_text(run / "up.csv", 100) == "a\n1\n"  # still inside, spelled oddly
    (run / "out.csv").symlink_to(small_run / "tokens.csv")
    (run / "loop.csv").symlink_to("loop.csv")
    for name, says in (("out.csv", "outside the run directory"), ("loop.csv", "symlink loop")):
        with pytest.raises(RunsError) as info:
            read_text(run / name, 100)
        assert says in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(RunsError, match="copy.csv: 4 bytes, larger than the limit of 3 bytes for this file"):
        read_text(run / "copy.csv", 3)


# ---------------------------------------------------------------------------- fuzzing run directories

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# examples per fuzz test, as in test_protocol.py: TESTBED_FUZZ_EXAMPLES=5000 searches longer
# (TESTBED_HYPOTHESIS=explore draws new ones)
EXAMPLES = int(__import__("os").environ.get("TESTBED_FUZZ_EXAMPLES", "200"))
CELLS = st.one_of(
    st.sampled_from(["", "inf", "-inf", "nan", "1e309", "-0", "0x10", "1_000", " 7", "7 ", "NaN", "∞",
                     "<b>1</b>", "\"", "\r", "\n", "9" * 400, "-9223372036854775809"]),
    st.text(max_size=30),
)


@st.composite
def _spoil(draw: Any) -> tuple[str, str, Any]:
    """(file, how, what): a cell of a CSV replaced, a JSON value replaced, bytes inserted
    or the file cut short."""
    from .hostile_runs import MARKUP

    name = draw(st.sampled_from(RESULT_FILES))
    how = draw(st.sampled_from(["cell", "bytes", "cut"] if name.endswith(".csv") else ["json", "bytes", "cut"]))
    if how == "cell":
        return name, how, (draw(st.integers(0, 200)), draw(st.integers(0, 20)), draw(CELLS))
    if how == "json":
        value = draw(st.one_of(CELLS, st.just(MARKUP), st.integers(), st.floats(), st.none(),
                               st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)))
        return name, how, (draw(st.sampled_from(["status", "algorithm", "scenario", "seed", "clock", "migrations",
                                                 "latency_ms", "fidelity", "tokens"])), value)
    if how == "bytes":
        return name, how, (draw(st.integers(0, 10_000)), draw(st.binary(min_size=1, max_size=40)))
    return name, how, draw(st.integers(0, 10_000))


def _apply(run: Path, name: str, how: str, what: Any) -> None:
    path = run / name
    if how == "cell":
        row, col, value = what
        try:
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
        except (ValueError, csv.Error):
            return  # spoilt already
        if not rows:
            return
        r = rows[row % len(rows)]
        if not r:
            return
        r[col % len(r)] = value
        with open(path, "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(rows)
    elif how == "json":
        key, value = what
        try:
            doc = json.loads(path.read_text())
            doc[key] = value
        except (ValueError, TypeError):
            return  # spoilt already (bytes inserted, cut short)
        path.write_text(json.dumps(doc))  # NaN and inf as JSON spells them (not strictly JSON)
    elif how == "bytes":
        at, blob = what
        data = path.read_bytes()
        at %= len(data) + 1
        path.write_bytes(data[:at] + blob + data[at:])
    else:
        data = path.read_bytes()
        path.write_bytes(data[:what % (len(data) + 1)])


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spoils=st.lists(_spoil(), min_size=1, max_size=3))
def test_fuzz_run_directories(spoils: list[tuple[str, str, Any]], small_run: Path, tmp_path: Path) -> None:
    """A run directory with cells, JSON values and bytes changed, or files cut short: the
    tools' readers (load_runs, run_stats and windows, compare's rows, tools.view's feed and
    the report page) either work or raise RunsError with one line naming a file of the run,
    in well under a second (5 s allows for a busy host); what they hand the page is strict
    JSON."""
    import time

    from testbed.webview.page import render
    from testbed.webview.server import dumps
    from tools.view import load_feed

    from .conftest import fresh_dir

    run = fresh_dir(tmp_path) / "run"
    shutil.copytree(small_run, run)
    for name, how, what in spoils:
        _apply(run, name, how, what)
    t0 = time.monotonic()
    try:
        runs = load_runs([run])
        for r in runs:
            run_stats(r)
            r.event_tokens()
            r.devices()
        compare.compare_rows(runs)
        feed = load_feed([run], "report")
        snap = feed.snapshot()
        dumps(snap)  # allow_nan=False: no NaN or infinity reaches the page
        assert "<!--DATA-->" not in render(snap)
    except RunsError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith(str(run)), msg
    assert time.monotonic() - t0 < 5.0
