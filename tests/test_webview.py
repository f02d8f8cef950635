"""The view of runs without a browser: the state model (testbed/webview/state.py), its
server (`/api/state`, the pushed stream, the token off loopback), a live run read while it
goes (`experiment.run(tap=...)`, `runners.run --live`), and tools.view / tools.report on
finished and crashed runs. The page in a real browser: tests/test_browser.py."""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from runners import run as cli
from testbed.experiments import run as experiment
from testbed.harness.control import TOKEN_ENV
from testbed.scenario import load
from testbed.webview.page import inline_json, render
from testbed.webview.server import ViewServer
from testbed.webview.state import Cursor, Feed, RunRecord, cell
from tools import report, view

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 32  # bandwidth_drop: the link drops before token 24, resource_aware migrates at 25


def get_json(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def api(url: str, path: str) -> str:
    """`path` under a printed view URL (which may carry ?token=...)."""
    base, _, query = url.partition("?")
    return base + path + (f"?{query}" if query else "")


def rows(state_run: dict[str, Any], table: str) -> list[dict[str, Any]]:
    cols = state_run["columns"][table]
    return [dict(zip(cols, r, strict=True)) for r in state_run["rows"][table]]


# ---------------------------------------------------------------------------- state (pure)


def test_cells_from_live_values_and_csv_text_agree() -> None:
    assert cell("latency_ms", 1.5) == cell("latency_ms", "1.5") == 1.5
    assert cell("token", 7) == cell("token", "7") == 7
    assert cell("latency_ms", math.nan) is None and cell("latency_ms", "") is None
    assert cell("measured_mbps", math.inf) is None
    assert cell("over_high", True) == 1
    assert cell("device", 0) == "0" and cell("phase", "decode") == "decode"  # text stays text
    assert cell("detail", "from=a to=b") == "from=a to=b"


def _record(rec: RunRecord, k: int) -> None:
    rec.record("tokens.csv", {"token": k, "latency_ms": 10.0 + k, "predicted_ms": math.nan, "phase": "decode"})


def test_feed_sends_everything_then_only_what_is_new() -> None:
    feed = Feed("live")
    rec = feed.add(RunRecord("r1", "/x/r1", "static"))
    rec.record("meta.json", {"status": "running", "algorithm": "static", "scenario": {"devices": [{"name": "a"}]}})
    rec.record("placements.csv", {"token": 0, "block": "head.0.0", "device": "a"})
    _record(rec, 0)
    cur = Cursor()
    snap = feed.snapshot(cur)
    (r,) = snap["runs"]
    assert r["status"] == "running" and r["token"] == 0 and r["placement"] == {"head.0.0": "a"}
    assert rows(r, "tokens")[0]["latency_ms"] == 10.0 and rows(r, "tokens")[0]["predicted_ms"] is None
    assert feed.delta(cur) is None  # nothing new
    _record(rec, 1)
    _record(rec, 2)
    rec.record("placements.csv", {"token": 2, "block": "head.0.0", "device": "b"})
    d = feed.delta(cur)
    (part,) = d["runs"]
    assert part["index"] == 0 and "meta" not in part and "columns" not in part
    assert [x[0] for x in part["rows"]["tokens"]] == [1, 2]
    assert part["rows"]["placements"] == [[2, "head.0.0", "b"]] and part["rows"]["events"] == []
    assert feed.delta(cur) is None
    rec.record("summary.json", {"status": "completed"})
    d = feed.delta(cur)
    assert d["runs"][0]["summary"] == {"status": "completed"} and d["runs"][0]["status"] == "completed"
    # a second run appears whole, and `finished` is sent once
    rec2 = feed.add(RunRecord("r2", "/x/r2", "greedy"))
    _record(rec2, 0)
    feed.finished = True
    d = feed.delta(cur)
    assert d["finished"] is True and d["runs"][0]["index"] == 1 and "columns" in d["runs"][0]
    assert len(d["runs"][0]["rows"]["tokens"]) == 1
    assert feed.delta(cur) is None
    assert rec.placement(1) == {"head.0.0": "a"} and rec.placement() == {"head.0.0": "b"}
    assert rec.devices() == ["a", "b"]  # b only seen in the placement (a device that joined)


def test_inline_json_cannot_end_its_script_element() -> None:
    text = inline_json({"detail": "</script><script>alert(1)</script> <!-- x"})
    assert "</" not in text and "<!--" not in text
    assert json.loads(text) == {"detail": "</script><script>alert(1)</script> <!-- x"}
    page = render({"runs": [], "detail": "</script>"})
    assert page.count("</script>") == 2  # the data element's and the script's own
    assert "/*JS*/" not in page and "/*CSS*/" not in page


def _code(js: str) -> str:
    """view.js without its comments (// to the end of a line, outside strings well enough
    for this file: it has no '//' inside a string)."""
    return re.sub(r"(?m)^\s*//.*$|\s//\s.*$", "", js)


def test_view_js_builds_markup_only_through_the_escaping_tag() -> None:
    """The page makes markup in one way: the `h` template tag escapes every value, and the
    one innerHTML assignment (in setHtml) refuses anything `h` did not build. So: no other
    innerHTML, outerHTML, insertAdjacentHTML, document.write or eval; `esc` and `new Html`
    used only inside the tag; no markup template without the tag; and no `+` joining
    markup (which would turn it into a plain string)."""
    js = _code((ROOT / "testbed/webview/static/view.js").read_text())
    assert re.findall(r"\.innerHTML\b", js) == [".innerHTML"]
    assert re.search(r"function setHtml\(el, html\) \{\n.*instanceof Html.*\n\s*el\.innerHTML = html\.s;", js)
    for bad in ("outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", "srcdoc",
                "createContextualFragment", "DOMParser"):
        assert bad not in js, bad
    assert len(re.findall(r"\bnew Html\(", js)) == 1 and len(re.findall(r"\besc\(", js)) == 1
    # every template literal that starts with markup is tagged h
    untagged = re.findall(r"(?<!\bh)`\s*<", js)
    assert untagged == [], untagged
    joined = re.findall(r"`\s*\+\s*h`|h`[^`\n]*`\s*\+", js)
    assert joined == [], joined


def test_view_js_escaping_tag_in_node(tmp_path: Path) -> None:
    """The tag itself, run by node: values are escaped in text and attributes, markup built
    by the tag (and arrays of it) is kept, and setHtml refuses a plain string."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    js = (ROOT / "testbed/webview/static/view.js").read_text()
    start = js.index("  const esc = ")
    end = js.index("  const api = ")
    script = tmp_path / "tag.js"
    script.write_text(js[start:end] + """
const evil = `"'><img src=x onerror=alert(1)>&`;
const out = h`<p title="${evil}">${evil}${[h`<b>${evil}</b>`, h`<i>ok</i>`]}</p>`.s;
let refused = false;
try { setHtml({}, "<b>raw</b>"); } catch (e) { refused = e instanceof TypeError; }
const el = {};
setHtml(el, h`<u>${1.5}</u>`);
console.log(JSON.stringify([out, refused, el.innerHTML]));
""")
    res = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    out, refused, inner = json.loads(res.stdout)
    e = "&quot;&#39;&gt;&lt;img src=x onerror=alert(1)&gt;&amp;"
    assert out == f'<p title="{e}">{e}<b>{e}</b><i>ok</i></p>'
    assert refused and inner == "<u>1.5</u>"


# ---------------------------------------------------------------------------- the server


def _stream_events(url: str, n: int, timeout: float = 10) -> list[tuple[str, Any]]:
    """The first `n` server-sent events of `url`."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    conn.request("GET", u.path + (f"?{u.query}" if u.query else ""))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/event-stream")
    out, event = [], None
    try:
        while len(out) < n:
            line = resp.readline().decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                out.append((event, json.loads(line[6:])))
    finally:
        conn.close()
    return out


def test_stream_pushes_new_rows_and_ends_when_the_feed_is_finished() -> None:
    feed = Feed("live")
    rec = feed.add(RunRecord("r1", "", "static"))
    _record(rec, 0)
    server = ViewServer(feed)
    url = server.start()
    try:
        assert "token=" not in url  # loopback: no token
        import threading

        def later() -> None:
            time.sleep(0.4)
            _record(rec, 1)
            time.sleep(0.4)
            feed.finished = True

        t = threading.Thread(target=later)
        t.start()
        events = _stream_events(api(url, "api/stream"), 4)
        t.join()
        kinds = [e for e, _ in events]
        assert kinds[0] == "state" and kinds[-1] == "end", kinds
        assert len(events[0][1]["runs"][0]["rows"]["tokens"]) == 1
        pushed = [r for e, d in events if e == "update" for p in d["runs"] for r in p["rows"]["tokens"]]
        assert [r[0] for r in pushed] == [1]  # only the new row, once
        assert any(d.get("finished") for e, d in events if e == "update")
        state = get_json(api(url, "api/state"))
        assert state["finished"] is True and len(state["runs"][0]["rows"]["tokens"]) == 2
        with urllib.request.urlopen(url, timeout=10) as r:
            assert b"<svg id=\"latency\"" in r.read()
    finally:
        server.stop(linger_s=0)


def test_off_loopback_the_token_is_required() -> None:
    server = ViewServer(Feed("view"), host="127.0.0.2")  # another address (still this machine)
    try:
        url = server.start()
    except OSError as e:
        pytest.skip(f"cannot bind 127.0.0.2 here: {e}")
    try:
        token = re.search(r"\?token=(\S+)$", url).group(1)
        assert len(token) >= 16
        bare = url.split("?")[0]
        for path in ("", "api/state", "api/stream"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(bare + path, timeout=10)
            assert e.value.code == 401
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(bare + "api/state?token=" + token[:-1] + "x", timeout=10)
        assert get_json(api(url, "api/state"))["mode"] == "view"
        req = urllib.request.Request(bare + "api/state", headers={"Authorization": f"Bearer {token}"})
        assert json.loads(urllib.request.urlopen(req, timeout=10).read())["runs"] == []
        # the token alone is not a bearer token; with it, any Host is fine (the token is the check)
        for header in (token, f"Basic {token}", f"Bearer{token}", f"Bearer {token}x"):
            assert _get(bare + "api/state", {"Authorization": header})[0] == 401, header
        assert _get(bare + "api/state", {"Authorization": f"bearer {token}", "Host": "evil.example"})[0] == 200
    finally:
        server.stop(linger_s=0)


def _get(url: str, headers: dict[str, str], timeout: float = 10) -> tuple[int, bytes]:
    """Status and body of a GET with exactly these headers (Host included, if given)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.putrequest("GET", u.path + (f"?{u.query}" if u.query else ""), skip_host="Host" in headers)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_without_a_token_only_loopback_host_names_are_served() -> None:
    """A page on another site can point its own name at 127.0.0.1 (DNS rebinding) and read
    what the browser fetches: without a token, a request whose Host is not loopback gets
    421 and nothing of the state."""
    server = ViewServer(Feed("view"))
    url = server.start()
    try:
        assert "token=" not in url
        port = urllib.parse.urlsplit(url).port
        for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LOCALHOST:{port}", "[::1]", f"[::1]:{port}"):
            status, body = _get(url + "api/state", {"Host": host})
            assert status == 200 and json.loads(body)["mode"] == "view", host
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil:80",
                     "127.0.0.2", "[::2]", "localhost:80:80", "[::1]x", "0.0.0.0", ""):
            for path in ("", "api/state", "api/stream"):
                status, body = _get(url + path, {"Host": host})
                assert status == 421 and b"runs" not in body, (host, path, status)
    finally:
        server.stop(linger_s=0)


# ---------------------------------------------------------------------------- a live run


@pytest.fixture(scope="module")
def prep() -> experiment.Prepared:
    return experiment.prepare(load(ROOT / "scenarios/bandwidth_drop.yaml").with_overrides(new_tokens=TOKENS))


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-8, abs_tol=1e-12)
    return a == b


def test_api_state_has_every_token_so_far_during_a_run(prep: experiment.Prepared, tmp_path: Path) -> None:
    """While the run goes on, /api/state has exactly the tokens produced so far, the
    placement changes at the migration, and at the end the live state equals the state
    tools.view reads back from the result files."""
    feed = Feed("live")
    server = ViewServer(feed)
    url = server.start()
    seen: list[tuple[int, int, dict[str, str]]] = []

    def progress(k: int) -> None:  # on the run's thread, after token k was written
        run = get_json(api(url, "api/state"))["runs"][-1]
        seen.append((k, len(run["rows"]["tokens"]), run["placement"]))

    run_dir = tmp_path / "run"
    try:
        rec = feed.add(RunRecord(run_dir.name, str(run_dir), "resource_aware"))
        out = experiment.run(prep, "resource_aware", run_dir, clock="virtual", progress=progress, tap=rec.record)
        assert out.ok, out.status
        feed.finished = True
        live = get_json(api(url, "api/state"))["runs"][0]
    finally:
        server.stop(linger_s=0)
    assert [n for _, n, _ in seen] == [k + 1 for k, _, _ in seen] == list(range(1, TOKENS + 1))
    assert seen[0][2] and seen[0][2] == seen[23][2]  # the first placement, kept until the drop
    moved = {b for b, d in seen[-1][2].items() if seen[0][2][b] != d}
    assert moved, "resource_aware moved no block after the drop"
    assert live["status"] == "completed" and live["summary"]["tokens"] == TOKENS
    files = view.load_feed([run_dir], "view").snapshot()["runs"][0]
    for table in ("tokens", "events", "placements", "telemetry", "links"):
        assert live["columns"][table] == files["columns"][table]
        assert len(live["rows"][table]) == len(files["rows"][table]) > 0, table
        for a, b in zip(live["rows"][table], files["rows"][table], strict=True):
            assert all(_close(x, y) for x, y in zip(a, b, strict=True)), (table, a, b)


def test_runner_live_option(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    scen = str(ROOT / "scenarios/steady.yaml")
    status = cli.main([scen, "--clock", "virtual", "--tokens", "3", "--out", str(tmp_path), "--live", "0"])
    got = capsys.readouterr()
    assert status == 0, got.err
    assert re.search(r"^live view: http://127\.0\.0\.1:\d+/$", got.out, re.M), got.out
    # off loopback: the printed URL carries the run's token, the one its agents get too
    monkeypatch.delenv(TOKEN_ENV, raising=False)  # restored afterwards if it was set
    try:
        status = cli.main([scen, "--clock", "virtual", "--tokens", "2", "--out", str(tmp_path),
                           "--live", "0", "--live-host", "127.0.0.2", "--quiet"])
        m = re.search(r"live view: http://127\.0\.0\.2:\d+/\?token=(\S+)", capsys.readouterr().err)
        assert status == 0 and m and m.group(1) == os.environ[TOKEN_ENV]
    finally:
        os.environ.pop(TOKEN_ENV, None)
    # bad input: one line, exit 2, no run directory
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        for args, where in ((["--live-host", "0.0.0.0"], "--live-host"), (["--live", "70000"], "--live"),
                            (["--live", str(taken)], "--live: cannot listen")):
            out = tmp_path / "bad"
            status = cli.main([scen, "--clock", "virtual", "--tokens", "3", "--out", str(out), *args])
            err = capsys.readouterr().err.strip().splitlines()
            assert status == 2 and len(err) == 1 and where in err[0], err
            assert not out.exists()


# ---------------------------------------------------------------------------- finished and crashed runs


@pytest.fixture(scope="module")
def runs_root(prep: experiment.Prepared, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two finished runs, and a copy of one as a crash would leave it: no summary.json,
    meta.json still `running`, tokens.csv cut in the middle of a row."""
    root = tmp_path_factory.mktemp("views")
    for alg in ("static", "resource_aware"):
        assert experiment.run(prep, alg, root / "done" / alg, clock="virtual").ok
    crashed = root / "crashed" / "resource_aware"
    shutil.copytree(root / "done" / "resource_aware", crashed)
    (crashed / "summary.json").unlink()
    meta = json.loads((crashed / "meta.json").read_text())
    meta.update(status="running", end=None)
    (crashed / "meta.json").write_text(json.dumps(meta))
    text = (crashed / "tokens.csv").read_text()
    cut = text.index("\n20,")  # keep tokens 0-19 and half of token 20's row
    (crashed / "tokens.csv").write_text(text[: cut + 12])
    return root


def test_view_reads_crashed_runs(runs_root: Path) -> None:
    feed = view.load_feed([runs_root / "crashed"], "view")
    (run,) = feed.snapshot()["runs"]
    assert run["status"] == "running" and run["summary"] is None
    assert [r["token"] for r in rows(run, "tokens")] == list(range(20))  # the cut row dropped
    assert run["token"] == 19 and run["placement"]


def test_report_is_one_self_contained_file(runs_root: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r" / "report.html"
    assert report.main([str(runs_root), "-o", str(out)]) == 0
    assert "3 run(s) ->" in capsys.readouterr().out
    html = out.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing fetched
    assert "<script src" not in html and "<link rel=\"stylesheet\"" not in html
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S).group(1))
    assert data["mode"] == "report" and len(data["runs"]) == 3
    by_label = {(r["meta"]["algorithm"], r["status"]): len(r["rows"]["tokens"]) for r in data["runs"]}
    assert by_label[("static", "completed")] == TOKENS
    assert by_label[("resource_aware", "running")] == 20  # the crashed copy, partial
    assert not list(out.parent.glob("*.tmp"))


@pytest.mark.parametrize("tool", ["view", "report"])
def test_no_run_is_one_line_and_exit_2(tool: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    main = view.main if tool == "view" else report.main
    for path, says in ((tmp_path / "empty", "no run directory"), (tmp_path / "missing", "no such file")):
        extra = ["-o", str(tmp_path / "r.html")] if tool == "report" else []
        assert main([str(path), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert not (tmp_path / "r.html").exists()


def test_view_command_serves_until_interrupted(runs_root: Path) -> None:
    p = subprocess.Popen([sys.executable, "-m", "tools.view", str(runs_root / "done")], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        url = re.search(r"http://\S+", line).group(0)
        state = get_json(api(url, "api/state"))
        assert state["mode"] == "view" and state["finished"] is True
        assert sorted(r["label"] for r in state["runs"]) == ["resource_aware", "static"]
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
