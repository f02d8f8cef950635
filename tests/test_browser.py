"""The page in a real browser: headless Chromium (tools/browser.py) against a live run of
bandwidth_drop (real clock, shortened) and against tools.view and a tools.report file of
finished runs. Skips, saying why, when selenium, chromium or chromedriver cannot be had
(.ci/run installs them), except where the environment variable CI is set (.ci/run sets it):
there it fails, so CI never passes with the page untested. Every wait is bounded; the live run is the only real-time part."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.experiments import run as experiment
from testbed.scenario import load
from tools.browser import BrowserUnavailable, browser, console_errors, wait_for

ROOT = Path(__file__).resolve().parents[1]

# the page's own hooks: latency points drawn, and the placement map's cells
POINTS = "+document.getElementById('latency').dataset.points || 0"
CELLS = ("[...document.querySelectorAll('rect.cell')].map(r => r.dataset.block + '=' + r.dataset.device)"
         ".sort().join(' ')")
STATUS = "document.getElementById('status').textContent"


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    why = ""
    try:
        d = browser(1400, 1000)
    except BrowserUnavailable as e:
        why = f"no headless browser: {e}"
    if why:
        if os.environ.get("CI"):  # CI must test the page: a browser that cannot start fails it
            pytest.fail(f"{why} (and CI={os.environ['CI']}: CI does not skip the browser tests)", pytrace=False)
        pytest.skip(why)
    try:
        yield d
    finally:
        d.quit()


def _open(driver: Any, url: str) -> None:
    """Load `url` on a blank slate: the previous page is left first (it closes its own
    stream, so a server stopped after it cannot log an error into this test) and the
    console's earlier messages are drained."""
    driver.get("about:blank")
    console_errors(driver)
    driver.get(url)


def _leave(driver: Any) -> None:
    """Leave the page before its server stops, then drop what leaving logged."""
    driver.get("about:blank")
    console_errors(driver)


def _map(cells: str) -> dict[str, str]:
    return dict(c.split("=", 1) for c in cells.split())


def _placement_at(run_dir: Path, k: int) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(run_dir / "placements.csv", newline="") as f:
        for r in csv.DictReader(f):
            if int(r["token"]) <= k:
                out[r["block"]] = r["device"]
    return out


def test_live_page_follows_the_run(driver: Any, tmp_path: Path) -> None:
    """A live run of the main job, shortened: the chart gains points while the run goes
    on, the placement map changes at resource_aware's migration after the drop, and the
    page logs no error."""
    cmd = [sys.executable, "-m", "runners.run", "scenarios/bandwidth_drop.yaml", "--tokens", "40",
           "--time-scale", "12", "--out", str(tmp_path), "--live", "0", "--quiet"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()  # --quiet: the URL goes to stderr, first
        m = re.search(r"live view: (http://\S+)", line)
        assert m, line + p.stderr.read()
        _open(driver, m.group(1))
        first = wait_for(driver, f"({POINTS}) >= 2 && ({POINTS})", 120)
        early = _map(wait_for(driver, CELLS, 30))
        grown = wait_for(driver, f"({POINTS}) >= {first + 5} && ({POINTS})", 60)
        assert "live" in driver.execute_script(f"return {STATUS}") or p.poll() is None, \
            "the run ended before the page saw it grow"
        assert grown >= first + 5
        # resource_aware moves heads off the slow link after token 24
        assert first < 20, "the page saw the run only after the drop"
        late = _map(wait_for(driver, f"({POINTS}) >= 30 && {CELLS}", 120))
        assert late != early, "the placement map did not change at the migration"
        assert set(late) == set(early)
        wait_for(driver, f"{STATUS} === 'run finished'", 60)
        assert p.wait(timeout=60) == 0, p.stderr.read()
        assert console_errors(driver) == []
        run_dir = next(tmp_path.glob("bandwidth_drop/*"))
        assert int(driver.execute_script(f"return {POINTS}")) == 39  # every decode token arrived
        assert early == _placement_at(run_dir, 0)
        assert _map(driver.execute_script(f"return {CELLS}")) == _placement_at(run_dir, 39)
    finally:
        _leave(driver)
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    prep = experiment.prepare(load(ROOT / "scenarios/bandwidth_drop.yaml").with_overrides(new_tokens=40))
    for alg in ("static", "resource_aware"):
        assert experiment.run(prep, alg, root / alg, clock="virtual").ok
    return root


def _slide(driver: Any, k: int) -> dict[str, str]:
    driver.execute_script(
        "const s = document.getElementById('slider'); s.value = arguments[0];"
        "s.dispatchEvent(new Event('input'));", k)
    wait_for(driver, f"document.getElementById('token-label').textContent === '{k}'", 10)
    cards = driver.execute_script(
        "return [...document.querySelectorAll('.card')].map(c => [c.dataset.run,"
        "[...c.querySelectorAll('rect.cell')].map(r => r.dataset.block + '=' + r.dataset.device).join(' ')])")
    return {run: _map(cells) for run, cells in cards}


def _check_replay(driver: Any, root: Path) -> None:
    wait_for(driver, f"({POINTS}) >= 78", 30)  # two runs of 39 decode tokens each
    at0, at30 = _slide(driver, 0), _slide(driver, 30)
    assert set(at0) == {"static", "resource_aware"}
    for alg in at0:
        assert at0[alg] == _placement_at(root / alg, 0)
        assert at30[alg] == _placement_at(root / alg, 30)
    assert at0["resource_aware"] != at30["resource_aware"]  # the slider replays the migration
    assert at0["static"] == at30["static"]
    assert console_errors(driver) == []


def test_view_page_replays_the_placement(driver: Any, finished: Path) -> None:
    p = subprocess.Popen([sys.executable, "-m", "tools.view", str(finished)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"http://\S+", p.stdout.readline()).group(0)
        _open(driver, url)
        _check_replay(driver, finished)
    finally:
        _leave(driver)
        p.terminate()
        p.wait(timeout=20)


def test_report_file_works_offline(driver: Any, finished: Path, tmp_path: Path) -> None:
    from tools import report

    out = tmp_path / "report.html"
    assert report.main([str(finished), "-o", str(out)]) == 0
    _open(driver, out.as_uri())
    _check_replay(driver, finished)
    assert "2 runs (report)" in wait_for(driver, STATUS, 10)


# ---------------------------------------------------------------------------- hostile files

# what a page that ran the files' markup would show: its elements, its scripts' effect
PWNED = ("return [window.__pwned === undefined, document.querySelectorAll('#pwn, img').length,"
         "[...document.scripts].filter(s => s.id !== 'data' && s.textContent.includes('__pwned')).length,"
         "document.body.innerText]")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A six-token run, copied with markup in every text field the tools accept."""
    from .conftest import make_scenario, run_virtual
    from .hostile_runs import marked_copy

    out = tmp_path_factory.mktemp("hostile")
    assert run_virtual(make_scenario(new_tokens=6), "resource_aware", out / "runs").ok
    (run,) = (out / "runs").iterdir()
    return marked_copy(run, out / "marked" / "run")


def _check_inert(driver: Any) -> None:
    """The page drew the run (its cards and its markup as text) and ran none of it."""
    from .hostile_runs import MARKUP

    wait_for(driver, "document.querySelectorAll('.card .events li').length > 0", 20)
    clean, elements, scripts, text = driver.execute_script(PWNED)
    assert clean and elements == 0 and scripts == 0
    assert text.count("<img id=pwn") >= 5 and "<script>window.__pwned=2</script>" in text
    assert MARKUP in driver.execute_script("return document.getElementById('title').textContent")
    assert "[object Object]" not in text  # no markup was turned into a plain string
    _slide(driver, 0)  # the slider redraws every part from the same rows
    assert driver.execute_script(PWNED)[:3] == [True, 0, 0]
    assert console_errors(driver) == []


def test_hostile_report_runs_nothing(driver: Any, hostile: Path, tmp_path: Path) -> None:
    from tools import report

    out = tmp_path / "report.html"
    assert report.main([str(hostile), "-o", str(out)]) == 0
    _open(driver, out.as_uri())
    _check_inert(driver)


def test_hostile_view_runs_nothing(driver: Any, hostile: Path) -> None:
    p = subprocess.Popen([sys.executable, "-m", "tools.view", str(hostile)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"http://\S+", p.stdout.readline()).group(0)
        _open(driver, url)
        _check_inert(driver)
    finally:
        _leave(driver)
        p.terminate()
        p.wait(timeout=20)


def test_markup_in_number_cells_stays_text(driver: Any, hostile: Path, tmp_path: Path) -> None:
    """The tools refuse a number column holding text; a state fed by other means (the
    live server takes the writer's rows as they are) can still carry it: the page shows
    it as text too. Every number cell of tokens.csv and the links is markup here."""
    from testbed.results.read import read_csv, read_json
    from testbed.webview.page import render
    from testbed.webview.state import TABLES, Feed, RunRecord

    from .hostile_runs import MARKUP

    rec = RunRecord("run", str(hostile), "alg" + MARKUP)
    rec.record("meta.json", read_json(hostile / "meta.json"))
    rec.record("summary.json", read_json(hostile / "summary.json"))
    for table, (name, _) in TABLES.items():
        header, rows = read_csv(hostile / name)
        if name in ("tokens.csv", "links.csv", "events.csv"):
            rows = [{c: (MARKUP if c not in ("phase", "src", "dst", "kind", "subject", "detail", "token") else v)
                     for c, v in r.items()} for r in rows]
        rec.load(table, header, rows)
    feed = Feed("report")
    feed.add(rec)
    feed.finished = True
    out = tmp_path / "cells.html"
    out.write_text(render(feed.snapshot(), title="cells"), encoding="utf-8")
    _open(driver, out.as_uri())
    wait_for(driver, "document.querySelectorAll('.card').length > 0", 20)
    clean, elements, scripts, text = driver.execute_script(PWNED)
    assert clean and elements == 0 and scripts == 0 and "<img id=pwn" in text
    assert console_errors(driver) == []
