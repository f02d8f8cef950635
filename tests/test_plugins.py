"""Placement plug-ins: `--algorithm file.py:Class`, `module:Class` and installed entry points.

A plug-in that cannot be used is bad input (exit 2, one line naming the file and
`--algorithm`, no run directory); one that raises in `place` or answers an invalid placement
fails only its own run (`failed: ...`, the reason and traceback in meta.json) while the other
algorithms of the same command complete (exit 1). The example plug-in completes a shortened
bandwidth_drop.yaml with the reference's tokens.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from runners import run as cli
from testbed.model import cost
from testbed.placement.algorithm import Algorithm, check_placement
from testbed.placement.plugins import Checked, Plugin, PluginFailed, PluginRefused
from testbed.placement.problem import Infeasible, Placement, memory_need
from testbed.placement.registry import instantiate, lookup
from tests.conftest import make_scenario, read_json, run_virtual, scenario_dict
from tests.test_placement import snapshot

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fastest_first.py"

# one file of plug-ins, good and bad; every test writes it where it needs it
PLUGINS = '''\
from testbed.placement.problem import Infeasible, Placement, memory_need


def _everything_on(snap, j):
    return Placement(snap.spec, tuple(j for _ in snap.spec.blocks))


class Good:
    """Every block on the first usable device."""

    name = "good one"  # a space: the run directory gets a sanitised name
    dynamic = False

    def place(self, snap):
        j = next((j for j, d in enumerate(snap.devices) if d.usable), None)
        if j is None:
            raise Infeasible("nothing usable")
        return _everything_on(snap, j)


def _deep_helper(snap):
    return {}["no such key"]


class Raiser:
    name = "raiser"
    dynamic = False

    def place(self, snap):
        return _deep_helper(snap)


class RaisesLater:
    """Places like Good, then raises at the first re-plan."""

    name = "raises_later"
    dynamic = True

    def __init__(self):
        self.calls = 0

    def place(self, snap):
        self.calls += 1
        if self.calls > 1:
            raise ValueError("second thoughts")
        return Good().place(snap)


class OutOfRange:
    name = "out_of_range"
    dynamic = False

    def place(self, snap):
        return _everything_on(snap, len(snap.devices))


class Scribbler:
    name = "scribbler"
    dynamic = False

    def place(self, snap):
        snap.rate[0, 1] = 0.0
        return Good().place(snap)


def not_a_class(snap):
    return None


class NoPlace:
    name = "no_place"
    dynamic = False


class BadCtor:
    name = "bad_ctor"
    dynamic = False

    def __init__(self):
        raise RuntimeError("ctor boom")

    def place(self, snap):
        return None


class NeedsArgs:
    name = "needs_args"
    dynamic = False

    def __init__(self, k):
        self.k = k

    def place(self, snap):
        return None


class NumberName:
    name = 3
    dynamic = False

    def place(self, snap):
        return None


class StringDynamic:
    name = "string_dynamic"
    dynamic = "yes"

    def place(self, snap):
        return None


class NoArgPlace:
    name = "no_arg_place"
    dynamic = False

    def place(self):
        return None


class CalledGreedy:
    name = "greedy"
    dynamic = False

    def place(self, snap):
        return None


class AlsoGood(Good):
    pass


class Sleeper:
    """Never answers: waits forever (a blocking call, which no exception stops)."""

    name = "sleeper"
    dynamic = False

    def place(self, snap):
        import threading
        threading.Event().wait()


class Spinner:
    """Never answers: loops forever in Python (stopped once abandoned)."""

    name = "spinner"
    dynamic = False
    decision_timeout_s = 0.5  # its own limit

    def place(self, snap):
        while True:
            pass


class Exiter:
    name = "exiter"
    dynamic = False

    def place(self, snap):
        import sys
        sys.exit(3)


class Interrupter:
    name = "interrupter"
    dynamic = True

    def __init__(self):
        self.calls = 0

    def place(self, snap):
        self.calls += 1
        if self.calls > 1:
            raise KeyboardInterrupt
        return Good().place(snap)


class ExitsWhenMade:
    name = "exits_when_made"
    dynamic = False

    def __init__(self):
        raise SystemExit("bye")

    def place(self, snap):
        return None


class BadLimit(Good):
    decision_timeout_s = -1
'''


@pytest.fixture
def plugin_file(tmp_path: Path) -> Path:
    p = tmp_path / "plugins" / "my_algs.py"
    p.parent.mkdir()
    p.write_text(PLUGINS)
    return p


@pytest.fixture
def scen_file(tmp_path: Path) -> Path:
    """A small, quick scenario (gpt-tiny, 4 devices, 5 tokens, re-plans every 2 tokens)."""
    p = tmp_path / "small.yaml"
    p.write_text(yaml.safe_dump(scenario_dict(new_tokens=5, interval=2), sort_keys=False))
    return p


def _runs(out: Path) -> dict[str, Path]:
    """algorithm part of the run directory name -> the directory."""
    dirs = sorted(p for p in out.glob("*/*") if p.is_dir())
    return {d.name.split("-", 1)[1].rsplit("-s", 1)[0]: d for d in dirs}


# ---------------------------------------------------------------------------- loading


def _check_good(plugin: str | Plugin) -> None:
    assert isinstance(plugin, Plugin), plugin
    assert plugin.name == "good one"
    alg = instantiate(plugin)
    assert isinstance(alg, Checked) and isinstance(alg, Algorithm)
    assert alg.name == "good one" and alg.dynamic is False
    snap = snapshot()
    p = alg.place(snap)
    assert p.assign == (0,) * len(snap.spec.blocks)
    assert instantiate(plugin) is not alg  # a fresh instance per run


def test_load_by_file_path(plugin_file: Path) -> None:
    plugin = lookup(f"{plugin_file}:Good")
    _check_good(plugin)
    assert plugin.origin["file"] == str(plugin_file.resolve())
    assert plugin.origin["class"] == "Good"


def test_load_by_relative_file_path(plugin_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(plugin_file.parent.parent)
    _check_good(lookup("plugins/my_algs.py:Good"))


def test_load_by_module_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "site" / "plugpkg_mod"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "algs.py").write_text(PLUGINS)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    try:
        plugin = lookup("plugpkg_mod.algs:Good")
        _check_good(plugin)
        assert plugin.origin["module"] == "plugpkg_mod.algs"
        with pytest.raises(PluginRefused, match="no module named 'plugpkg_mod.nope'"):
            lookup("plugpkg_mod.nope:Good")
    finally:
        for m in [m for m in sys.modules if m.startswith("plugpkg_mod")]:
            del sys.modules[m]


def _install_entry_points(site: Path, dist: str, entries: dict[str, str]) -> None:
    """A minimal installed distribution on `site` registering `entries` in the group."""
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entries.items())
    (info / "entry_points.txt").write_text(f"[edge_llm_testbed.algorithms]\n{lines}")


def test_load_by_entry_point(tmp_path: Path, scen_file: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site"
    (site / "plugpkg_ep").mkdir(parents=True)
    (site / "plugpkg_ep" / "__init__.py").write_text(PLUGINS)
    _install_entry_points(site, "plugpkg_ep", {"good_ep": "plugpkg_ep:Good",
                                               "broken_ep": "plugpkg_ep.missing:Good"})
    monkeypatch.syspath_prepend(str(site))
    try:
        plugin = lookup("good_ep")
        _check_good(plugin)
        assert plugin.origin["entry_point"] == "edge_llm_testbed.algorithms:good_ep"
        assert plugin.origin["value"] == "plugpkg_ep:Good"
        with pytest.raises(PluginRefused, match="entry point 'broken_ep'.*ModuleNotFoundError"):
            lookup("broken_ep")
        # an unknown name lists the installed plug-ins
        with pytest.raises(PluginRefused, match="installed plug-ins: broken_ep, good_ep"):
            lookup("nothing_by_this_name")
        # and the command line takes the name
        out = tmp_path / "out"
        status = cli.main([str(scen_file), "--clock", "virtual", "--tokens", "2", "--quiet", "--out", str(out),
                           "--algorithm", "good_ep"])
        assert status == 0, capsys.readouterr()
        (d,) = _runs(out).values()
        assert read_json(d / "meta.json")["plugin"]["entry_point"] == "edge_llm_testbed.algorithms:good_ep"
    finally:
        for m in [m for m in sys.modules if m.startswith("plugpkg_ep")]:
            del sys.modules[m]


# ---------------------------------------------------------------------------- refusals: exit 2

REFUSALS = [
    # (id, --algorithm value with {file} for the plug-in file, expected part of the message)
    ("missing_file", "{dir}/nope.py:Good", "no such file"),
    ("not_python", "{dir}:Good", "not a Python file"),
    ("missing_class", "{file}:Nope", "'Nope' not found (its classes: AlsoGood, BadCtor"),
    ("not_a_class", "{file}:not_a_class", "is a function, not a class"),
    ("no_place", "{file}:NoPlace", "not an Algorithm: no `place`"),
    ("ctor_raises", "{file}:BadCtor", "BadCtor() with no arguments raised RuntimeError: ctor boom"),
    ("ctor_needs_args", "{file}:NeedsArgs", "missing 1 required positional argument"),
    ("name_not_str", "{file}:NumberName", "`name` must be a non-empty str, got 3"),
    ("dynamic_not_bool", "{file}:StringDynamic", "`dynamic` must be True or False"),
    ("place_without_snapshot", "{file}:NoArgPlace", "`place` must take one argument"),
    ("builtin_name", "{file}:CalledGreedy", "like a built-in algorithm"),
    ("same_name_twice", "{file}:Good,{file}:AlsoGood", "two algorithms are named 'good one'"),
    ("no_module", "no_such_plugin_pkg.algs:Good", "no module named 'no_such_plugin_pkg'"),
    ("unknown_name", "no_such_plugin", "unknown algorithm 'no_such_plugin'"),
    ("import_fails", "{dir}/broken.py:Good", "loading {dir}/broken.py raised NameError: name "
                                             "'undefined_thing' is not defined (line 3)"),
    ("syntax_error", "{dir}/syntax.py:Good", "raised SyntaxError"),
]


@pytest.mark.parametrize("arg,expect", [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS])
def test_refused_plugin_is_bad_input(arg: str, expect: str, plugin_file: Path, scen_file: Path,
                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = plugin_file.parent
    (d / "broken.py").write_text("import math\n\nx = undefined_thing + 1\n")
    (d / "syntax.py").write_text("class Good:\n    def place(self, snap)\n        pass\n")
    out = tmp_path / "out"
    status = cli.main([str(scen_file), "--clock", "virtual", "--out", str(out),
                       "--algorithm", f"resource_aware,{arg.format(file=plugin_file, dir=d)}"])
    got = capsys.readouterr()
    assert status == 2, got
    line = got.err.rstrip("\n")
    assert line and "\n" not in line, f"not one line: {got.err!r}"
    assert "Traceback" not in got.out + got.err
    assert line.startswith(f"error: {scen_file}: --algorithm: "), line
    assert expect.format(file=plugin_file, dir=d) in line, line
    assert got.out == ""
    assert not out.exists(), sorted(out.rglob("*"))  # no run, not even resource_aware's


# ---------------------------------------------------------------------------- failures at run time


def test_failing_plugins_fail_alone(plugin_file: Path, scen_file: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    algs = f"{plugin_file}:Raiser,resource_aware,{plugin_file}:OutOfRange,{plugin_file}:RaisesLater"
    status = cli.main([str(scen_file), "--clock", "virtual", "--out", str(out), "--algorithm", algs])
    got = capsys.readouterr()
    assert status == 1, got  # a run failed
    assert "Traceback" not in got.out + got.err
    runs = _runs(out)
    assert set(runs) == {"raiser", "resource_aware", "out_of_range", "raises_later"}, runs

    ok = read_json(runs["resource_aware"] / "meta.json")
    assert ok["status"] == "completed" and "error" not in ok
    assert read_json(runs["resource_aware"] / "summary.json")["correctness"]["tokens_match"] is True

    raiser = read_json(runs["raiser"] / "meta.json")
    assert raiser["status"] == "failed: raiser: place() raised KeyError: 'no such key'"
    tb = raiser["error"]["traceback"]
    assert f'File "{plugin_file.resolve()}"' in tb and "_deep_helper" in tb and tb.rstrip().endswith("KeyError: 'no such key'")
    assert "plugins.py" not in tb  # the plug-in's frames only
    assert raiser["plugin"] == {"spec": f"{plugin_file}:Raiser", "file": str(plugin_file.resolve()),
                                "class": "Raiser"}
    assert not (runs["raiser"] / "error.log").exists()  # not a testbed bug

    bad = read_json(runs["out_of_range"] / "meta.json")
    assert bad["status"].startswith("failed: out_of_range: invalid placement: head.0.0 -> 4: no such device (0..3)")
    assert "\n" not in bad["status"]
    n_blocks = len(make_scenario().model.blocks)
    assert len(bad["error"]["problems"]) == n_blocks

    later = read_json(runs["raises_later"] / "meta.json")
    assert later["status"] == "failed: raises_later: place() raised ValueError: second thoughts"
    tokens = (runs["raises_later"] / "tokens.csv").read_text().splitlines()
    assert len(tokens) == 1 + 2  # header, tokens 0 and 1: the first re-plan is before token 2
    events = (runs["raises_later"] / "events.csv").read_text()
    assert "algorithm_error" in events

    # the one-line reasons are in the output, and the table has a row per algorithm
    assert "failed: raiser: place() raised KeyError: 'no such key'" in got.out
    assert "invalid placement: head.0.0 -> 4: no such device" in got.out
    table = got.out[got.out.index("per-token latency by algorithm"):]
    for name in ("raiser", "out_of_range", "raises_later"):
        assert any(name in line and "failed" in line for line in table.splitlines()), table
    assert any("resource_aware" in line and "completed" in line for line in table.splitlines()), table


def test_constructor_failing_at_run_time_fails_the_run(tmp_path: Path) -> None:
    # it passed the check when it was loaded (not here), and fails when the run makes its own
    class Flaky:
        def __init__(self) -> None:
            raise OSError("resource gone")

    plugin = Plugin("flaky.py:Flaky", Flaky, "flaky", {"spec": "flaky.py:Flaky"})
    outcome = run_virtual(make_scenario(), plugin, tmp_path / "out")
    assert outcome.status == "failed: flaky: creating Flaky() raised OSError: resource gone"
    meta = read_json(outcome.run_dir / "meta.json")
    assert meta["plugin"] == {"spec": "flaky.py:Flaky"}
    assert "OSError: resource gone" in meta["error"]["traceback"]


# ---------------------------------------------------------------------------- what a placement must satisfy


def _snap():
    spec_blocks = snapshot().spec.blocks
    total = sum(cost.block_bytes(snapshot().spec, b, 20) for b in spec_blocks)
    snap = snapshot(mem=[total * 2, total * 2, total * 2, total // 10])
    devices = list(snap.devices)
    devices[1] = replace(devices[1], host_blocks=False)
    devices[2] = replace(devices[2], alive=False)
    return snap.with_(devices=tuple(devices))


def _on(snap, js):
    n = len(snap.spec.blocks)
    return Placement(snap.spec, tuple(js[i % len(js)] for i in range(n)))


@pytest.mark.parametrize("make,expect", [
    (lambda s: _on(s, [0]), None),
    (lambda s: _on(s, [np.int64(0)]), None),  # numpy integers are fine
    (lambda s: [0] * len(s.spec.blocks), "returned list, not a Placement"),
    (lambda s: Placement(s.spec, (0,) * 3), f"3 device indices for {len(snapshot().spec.blocks)} blocks"),
    (lambda s: _on(s, [0, 4]), "-> 4: no such device (0..3)"),
    (lambda s: _on(s, [0, -1]), "-> -1: no such device"),
    (lambda s: _on(s, [0, 1.0]), "-> 1.0: not an integer device index"),
    (lambda s: _on(s, [0, True]), "-> True: not an integer device index"),
    (lambda s: _on(s, [0, 1]), "d1 cannot host blocks"),  # host_blocks: false
    (lambda s: _on(s, [0, 2]), "d2 cannot host blocks"),  # dead
    (lambda s: _on(s, [3]), "d3 needs"),  # over memory
    (lambda s: Placement(snapshot("gpt-tiny").spec, (0,) * len(snapshot("gpt-tiny").spec.blocks)),
     "for model 'gpt-tiny'"),
])
def test_check_placement(make, expect: str | None) -> None:
    snap = _snap()
    problems = check_placement(snap, make(snap))
    if expect is None:
        assert problems == []
    else:
        assert problems and any(expect in p for p in problems), problems

    # the guard refuses exactly these, with the reason
    class Answer:
        name, dynamic = "answer", False

        def place(self, s):
            return make(s)

    guarded = Checked(Answer(), "answer")
    if expect is None:
        assert guarded.place(snap).assign == (0,) * len(snap.spec.blocks)
    else:
        with pytest.raises(PluginFailed, match="answer: invalid placement") as e:
            guarded.place(snap)
        assert e.value.problems == problems and e.value.traceback is None


def test_guard_gives_read_only_matrices_and_passes_infeasible_through(plugin_file: Path) -> None:
    snap = snapshot()
    scribbler = lookup(f"{plugin_file}:Scribbler").create()
    with pytest.raises(PluginFailed, match="scribbler: place\\(\\) raised ValueError: assignment destination is read-only"):
        scribbler.place(snap)
    assert snap.rate[0, 1] > 0  # the controller's view is untouched

    good = lookup(f"{plugin_file}:Good").create()
    dead = snap.with_(devices=tuple(replace(d, alive=False) for d in snap.devices))
    with pytest.raises(Infeasible, match="nothing usable"):
        good.place(dead)


# ---------------------------------------------------------------------------- the example


def test_example_completes_bandwidth_drop_next_to_resource_aware(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(ROOT)  # the path as the tutorial writes it
    out = tmp_path / "out"
    status = cli.main(["scenarios/bandwidth_drop.yaml", "--clock", "virtual", "--tokens", "30", "--out", str(out),
                       "--algorithm", "examples/fastest_first.py:FastestFirst,resource_aware"])
    got = capsys.readouterr()
    assert status == 0, got
    runs = _runs(out)
    assert set(runs) == {"fastest_first", "resource_aware"}, runs
    for d in runs.values():
        meta = read_json(d / "meta.json")
        assert meta["status"] == "completed", meta["status"]
        s = read_json(d / "summary.json")
        assert s["tokens"] == 30 and s["correctness"]["tokens_match"] is True
    meta = read_json(runs["fastest_first"] / "meta.json")
    assert meta["algorithm"] == "fastest_first"
    assert meta["plugin"]["file"] == str(EXAMPLE)
    table = got.out[got.out.index("per-token latency by algorithm"):].splitlines()
    for name in ("fastest_first", "resource_aware"):
        assert any(name in line and "completed" in line and line.rstrip(" │").endswith("yes")
                   for line in table), table


def test_example_places_fastest_devices_first() -> None:
    from examples.fastest_first import FastestFirst

    snap = snapshot(flops=[8e9, 20e9, 3e9, 5e9])
    p = FastestFirst().place(snap)
    assert check_placement(snap, p) == []
    assert set(p.assign) == {1}  # everything fits on the fastest device
    # the fastest device has room for half of the model: it fills up, the rest goes to the
    # next fastest (8 GFLOP/s, room for everything); the slower two get nothing
    total = sum(cost.block_bytes(snap.spec, b, snap.n_end) for b in snap.spec.blocks)
    half = snapshot(flops=[8e9, 20e9, 3e9, 5e9], mem=[total, total // 2, total, total])
    p = FastestFirst().place(half)
    assert check_placement(half, p) == []
    assert p.assign[0] == 1 and set(p.assign) == {0, 1}, p.assign
    biggest = max(cost.block_bytes(snap.spec, b, snap.n_end) for b in snap.spec.blocks)
    assert memory_need(half, p)[1] > total // 2 - biggest  # filled, not just started
    with pytest.raises(Infeasible):
        FastestFirst().place(snapshot(mem=[1000] * 4))


def test_run_dir_name_is_sanitised(plugin_file: Path, scen_file: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    status = cli.main([str(scen_file), "--clock", "virtual", "--out", str(out), "--quiet", "--tokens", "2",
                       "--algorithm", f"{plugin_file}:Good"])
    got = capsys.readouterr()
    assert status == 0, got
    (d,) = [p for p in out.glob("*/*") if p.is_dir()]
    assert "-good_one-s0" in d.name, d.name
    assert json.loads((d / "meta.json").read_text())["algorithm"] == "good one"


def test_protocol_module_is_the_controllers() -> None:
    from testbed.agents import controller
    from testbed.placement import algorithm as protocol

    assert controller.Algorithm is protocol.Algorithm


# ---------------------------------------------------------------------------- code that never returns


def _cli(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """runners.run in a child process under a time limit: a plug-in that hangs the command
    fails this test instead of hanging it."""
    return subprocess.run([sys.executable, "-m", "runners.run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_plugins_that_never_return_exit_or_interrupt_fail_alone(plugin_file: Path, scen_file: Path,
                                                                 tmp_path: Path) -> None:
    """A place() that sleeps forever or loops forever fails its run at the decision time
    limit (--decision-timeout, or the plug-in's own); sys.exit and KeyboardInterrupt raised
    by place() fail that run only; the command runs every algorithm, exits 1, and no
    meta.json is left `running`."""
    out = tmp_path / "out"
    algs = ",".join(f"{plugin_file}:{c}" for c in ("Sleeper", "Spinner", "Exiter", "Interrupter")) + ",static"
    t0 = time.monotonic()
    res = _cli([str(scen_file), "--clock", "virtual", "--out", str(out), "--algorithm", algs,
                "--decision-timeout", "2"], timeout=180)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    runs = _runs(out)
    assert set(runs) == {"sleeper", "spinner", "exiter", "interrupter", "static"}, runs
    status = {name: read_json(d / "meta.json")["status"] for name, d in runs.items()}
    assert status == {
        "sleeper": "failed: sleeper: place() did not return within 2 s (the decision time limit; "
                   "--decision-timeout sets it)",
        "spinner": "failed: spinner: place() did not return within 2 s (the decision time limit; "
                   "--decision-timeout sets it)",
        "exiter": "failed: exiter: place() raised SystemExit (sys.exit(3))",
        "interrupter": "failed: interrupter: place() raised KeyboardInterrupt",
        "static": "completed",
    }, status
    for d in runs.values():
        assert read_json(d / "summary.json")["status"] == read_json(d / "meta.json")["status"]
    assert "raise KeyboardInterrupt" in read_json(runs["interrupter"] / "meta.json")["error"]["traceback"]
    assert len((runs["interrupter"] / "tokens.csv").read_text().splitlines()) == 1 + 2  # failed at the re-plan
    assert time.monotonic() - t0 < 120


def test_plugins_own_limit_and_constructor_failures(plugin_file: Path) -> None:
    """The plug-in's own decision_timeout_s applies without --decision-timeout; a constructor
    calling sys.exit is refused at loading (one line); a limit that is not a positive number
    is refused."""
    spinner = lookup(f"{plugin_file}:Spinner")
    assert isinstance(spinner, Plugin) and spinner.decision_timeout_s == 0.5
    t0 = time.monotonic()
    with pytest.raises(PluginFailed, match=r"^spinner: place\(\) did not return within 0.5 s"):
        instantiate(spinner).place(snapshot())
    assert time.monotonic() - t0 < 5
    with pytest.raises(PluginRefused, match=r"ExitsWhenMade\(\) with no arguments raised SystemExit \(sys.exit\('bye'\)\)$"):
        lookup(f"{plugin_file}:ExitsWhenMade")
    with pytest.raises(PluginRefused, match="`decision_timeout_s` must be a positive number of seconds, got -1"):
        lookup(f"{plugin_file}:BadLimit")


def test_real_ctrl_c_still_interrupts_a_plugin_that_never_returns(plugin_file: Path, scen_file: Path,
                                                                   tmp_path: Path) -> None:
    """SIGINT while the main thread waits for a sleeping place(): the command stops at once
    (exit 130), its run says `failed: interrupted`, and the next algorithm never starts."""
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "runners.run", str(scen_file), "--clock", "virtual", "--out",
                          str(out), "--algorithm", f"{plugin_file}:Sleeper,static"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*/*sleeper*/meta.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # the run is in place() now (it never returns)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == cli.EXIT_INTERRUPTED
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    runs = _runs(out)
    assert set(runs) == {"sleeper"}
    assert read_json(runs["sleeper"] / "meta.json")["status"] == "failed: interrupted"
