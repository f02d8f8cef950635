"""Agents over real sockets: authentication, hostile frames, separate processes (same
tokens as the in-process transport, no orphans), and device failures over websockets.
Everything talks to 127.0.0.1 only; every wait is bounded."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.agents import messages as P
from testbed.agents.device import DeviceAgent
from testbed.emulation.clock import run as run_loop
from testbed.model.blocks import RandomWeights
from testbed.model.spec import from_name
from testbed.scenario import DeviceSpec, LinkSpec
from testbed.transport.codec import encode
from testbed.transport.ws import WsEndpoint, check_bind

from .conftest import read_csv, read_json

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "t" * 32
SPEC = from_name("gpt-tiny")
LINK = LinkSpec(1000, 0.1)


async def _agent_endpoint(max_frame: int = 64 * 1024) -> tuple[DeviceAgent, WsEndpoint]:
    ep = WsEndpoint("dev", TOKEN, max_frame=max_frame)
    agent = DeviceAgent(DeviceSpec("dev", 1.0, 64, 57.6), SPEC, RandomWeights(SPEC, 0), ep.send, "src",
                        outgoing=lambda: dict(ep.links))
    ep.handler, ep.on_peer_down = agent.handle, agent.peer_down
    ep.on_fault = lambda where, what: None
    await ep.start()
    return agent, ep


async def _client(port: int, name: str, token: str = TOKEN, max_frame: int = 1 << 22) -> aiohttp.ClientWebSocketResponse:
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(f"http://127.0.0.1:{port}/peer", max_msg_size=max_frame,
                                  headers={"Authorization": f"Bearer {token}", "X-Agent": name})
    ws._test_session = session  # type: ignore[attr-defined]
    return ws


async def _close(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.close()
    await ws._test_session.close()  # type: ignore[attr-defined]


async def _telemetry_roundtrip(port: int) -> dict[str, Any]:
    """A legitimate peer ("src") asks for telemetry and gets the answer back."""
    ws = await _client(port, "src")
    try:
        await ws.send_bytes(encode({"t": P.TELEMETRY, "rid": 7, "probe_bytes": 0}))
        msg = await asyncio.wait_for(ws.receive(), 5)
        return msgpack.unpackb(msg.data)
    finally:
        await _close(ws)


def test_requests_without_the_run_token_are_refused() -> None:
    async def main() -> None:
        agent, ep = await _agent_endpoint()
        ep.add_peer("src", "http://127.0.0.1:1", LINK)
        async with aiohttp.ClientSession() as s:
            for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token", "X-Agent": "src"},
                            {"X-Agent": "src"}):
                for path in ("/peer", "/control"):
                    async with s.get(f"{ep.url}{path}", headers=headers) as r:
                        assert r.status == 401, (path, headers)
            async with s.get(f"{ep.url}/peer", headers={"Authorization": f"Bearer {TOKEN}", "X-Agent": "mallory"}) as r:
                assert r.status == 403  # right token, unknown agent
        assert ep.refused == 7
        assert (await _telemetry_roundtrip(ep.port))["ok"]  # a legitimate peer is served
        await agent.stop()
        await ep.close()

    run_loop(main, "real")


def test_agents_listen_on_loopback_unless_allowed() -> None:
    with pytest.raises(ValueError, match="--allow-remote"):
        check_bind("0.0.0.0", allow_remote=False)
    check_bind("0.0.0.0", allow_remote=True)
    check_bind("127.0.0.1", allow_remote=False)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(st.one_of(
    st.binary(max_size=2048),
    st.builds(lambda b: msgpack.packb({"t": "x", "seq": 1, "layer": 99, "pos": 0, "x": b}), st.binary(max_size=64)),
    st.builds(lambda n: msgpack.packb({"t": "x", "seq": 1, "layer": 0, "pos": 0,
                                       "x": {"dtype": "float32", "shape": [1, n], "data": b"\0" * 4 * n}}),
              st.integers(1, 100)),
    st.builds(lambda t: msgpack.packb({"t": t, "rid": "nope"}), st.sampled_from(["route", "block", "load", "gen"])),
), min_size=1, max_size=8), oversized=st.booleans())
def test_hostile_frames_do_not_kill_an_agent(frames: list[bytes], oversized: bool) -> None:
    """Random bytes, malformed messages and frames over the size limit are refused and
    counted; the agent keeps serving legitimate peers."""

    async def main() -> None:
        agent, ep = await _agent_endpoint(max_frame=64 * 1024)
        ep.add_peer("src", "http://127.0.0.1:1", LINK)
        ep.add_peer("mallory", "http://127.0.0.1:1", LINK)
        ws = await _client(ep.port, "mallory")
        for f in frames:
            await ws.send_bytes(f)
        await ws.send_str("not binary")
        if oversized:
            await ws.send_bytes(b"\0" * (64 * 1024 + 1))
        await asyncio.sleep(0.05)
        await _close(ws)
        assert ep.refused >= 1
        reply = await _telemetry_roundtrip(ep.port)
        assert reply["ok"] and reply["rid"] == 7
        assert agent.blocks == {}  # nothing hostile got installed
        await agent.stop()
        await ep.close()

    run_loop(main, "real")


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runners.run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _token_ids(run_dir: Path) -> list[str]:
    return [r["token_id"] for r in read_csv(run_dir / "tokens.csv")]


def _only_run(out: Path, scenario: str) -> Path:
    (d,) = sorted((out / scenario).iterdir())
    return d


def test_bandwidth_drop_over_processes_matches_virtual(tmp_path: Path) -> None:
    v = _cli("scenarios/bandwidth_drop.yaml", "--clock", "virtual", "--tokens", "40", "--out", str(tmp_path / "v"), "--quiet")
    assert v.returncode == 0, v.stderr
    # a fixed time scale: what is checked here is the data path, not the timing (test_realtime)
    p = _cli("scenarios/bandwidth_drop.yaml", "--transport", "ws", "--processes", "--tokens", "40",
             "--time-scale", "10", "--out", str(tmp_path / "p"), "--quiet")
    assert p.returncode == 0, p.stdout + p.stderr
    vd, pd = _only_run(tmp_path / "v", "bandwidth_drop"), _only_run(tmp_path / "p", "bandwidth_drop")
    for f in ("meta.json", "summary.json", "tokens.csv", "events.csv", "placements.csv", "telemetry.csv", "links.csv"):
        assert (pd / f).stat().st_size > 0, f
    assert _token_ids(pd) == _token_ids(vd)
    meta = read_json(pd / "meta.json")
    assert meta["transport"] == "ws" and meta["processes"] and meta["status"] == "completed"
    summary = read_json(pd / "summary.json")
    assert summary["correctness"]["tokens_match"]
    # a run that ends normally records no failure (agents stopping after
    # the last token are not news), and every time counts from the run's start
    events = read_csv(pd / "events.csv")
    assert not [e for e in events if e["kind"] in ("device_failed", "fault")], events
    for name, col in (("events.csv", "t_s"), ("tokens.csv", "t_start_s"), ("telemetry.csv", "t_s")):
        for row in read_csv(pd / name):
            assert 0 <= float(row[col]) <= summary["emulated_s"], (name, row)


# a fixed scale: this checks recovery, not fidelity, and a scale that rises with the host's
# lateness (the default) would only make the run longer
@pytest.mark.parametrize("mode", [("--clock", "virtual"), ("--transport", "ws", "--time-scale", "10", "--fixed-time-scale"),
                                  ("--processes", "--time-scale", "10", "--fixed-time-scale")],
                         ids=["inproc", "ws", "processes"])
def test_device_failure_recovers_with_every_transport(mode: tuple[str, ...], tmp_path: Path) -> None:
    r = _cli("scenarios/device_failure.yaml", *mode, "--tokens", "56", "--out", str(tmp_path), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    d = _only_run(tmp_path, "device_failure")
    s = read_json(d / "summary.json")
    assert s["correctness"]["tokens_match"], s["correctness"]
    kinds = [e["kind"] for e in read_csv(d / "events.csv")]
    assert "device_failed" in kinds and "recovered" in kinds
    assert kinds.index("device_failed") < kinds.index("recovered")
    assert "device_joined" in kinds
    assert len(s["recover_ms"]) == 1 and s["recover_ms"][0] > 0


def _agents_of(pid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline", "ppid"]):
        cmd = p.info["cmdline"] or []
        if "runners.agent" in cmd and p.info["ppid"] == pid:
            out.append(p)
    return out


def _orphans(scenario_marker: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if "runners.agent" in (p.info["cmdline"] or []) and scenario_marker in " ".join(p.info["cmdline"] or [])]


@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_an_interrupted_run_leaves_no_agent_process(how: str, tmp_path: Path) -> None:
    # a given time scale: no calibration pilot (whose agents would come and go first)
    runner = subprocess.Popen([sys.executable, "-m", "runners.run", "scenarios/steady.yaml", "--processes",
                               "--tokens", "120", "--time-scale", "4", "--out", str(tmp_path), "--quiet"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        agents: list[psutil.Process] = []
        while time.monotonic() < deadline and len(agents) < 4:
            agents = _agents_of(runner.pid)
            time.sleep(0.2)
        assert len(agents) == 4, "the agents did not start"
        time.sleep(1.0)  # let generation begin
        runner.send_signal(signal.SIGINT if how == "sigint" else signal.SIGKILL)
        runner.wait(timeout=30)
        gone, alive = psutil.wait_procs(agents, timeout=15)
        assert not alive, [p.pid for p in alive]
    finally:
        if runner.poll() is None:
            runner.kill()
    if how == "sigint":  # the run records why it ended, and says so in one line (exit 130)
        (d,) = sorted((tmp_path / "steady").iterdir())
        assert read_json(d / "meta.json")["status"] == "failed: interrupted"
        err = runner.stderr.read().decode() if runner.stderr else ""
        assert runner.returncode == 130, err
        # (the agents share the runner's stderr: only the runner's own line is checked)
        assert "Traceback" not in err and err.strip().splitlines()[-1] == f"interrupted: results in {d}", err


def test_agent_on_a_port_in_use_says_so_in_one_line() -> None:
    """`runners.agent --port P` with P taken: one line on stderr and exit status 3."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "TESTBED_RUN_TOKEN": TOKEN}
        r = subprocess.run([sys.executable, "-m", "runners.agent", "--scenario", "scenarios/steady.yaml",
                            "--device", "pi-a", "--port", str(port)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, env=env)
    assert r.returncode == 3, r.stderr
    assert r.stderr.strip() == f"error: --host 127.0.0.1 --port {port}: already in use", r.stderr


def test_processes_refuse_without_token() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TESTBED_RUN_TOKEN"}
    r = subprocess.run([sys.executable, "-m", "runners.agent", "--scenario", "scenarios/steady.yaml",
                        "--device", "pi-a"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "TESTBED_RUN_TOKEN" in r.stderr
    torch.manual_seed(0)  # (keep torch imported for the hypothesis test above)


def test_content_sent_early_is_previewed_then_handled_once_at_its_arrival() -> None:
    """A frame's content ahead of its arrival (due -n) goes to the previewer at once and
    is handled only when its marker arrives, as of the marker's due time; content only
    (due -inf) is previewed and never handled; a marker whose content is not held is a
    lost frame, one without a number a refusal; what is held is bounded."""
    from testbed.transport import ws as W

    async def main() -> tuple[list[Any], list[Any], int, int, int]:
        ep = WsEndpoint("b", "t")
        seen: list[Any] = []
        handled: list[Any] = []
        ep.previewer = lambda peer, msg: seen.append((peer, msg["x"]))
        ep.handler = lambda peer, msg, at: handled.append((peer, msg["x"], at))
        now = 1.0  # when the frames arrive; the marker was due 0.99
        ep._receive("a", encode({"due": -1.0, "t": "li", "x": 1}), now)
        ep._receive("a", encode({"due": -float("inf"), "t": "li", "x": 2}), now)
        assert handled == []
        ep._receive("a", encode({"due": now - 0.01, "t": W.ARRIVAL, "n": 1}), now)
        ep._receive("a", encode({"due": now, "t": W.ARRIVAL, "n": 1}), now)  # a second marker: nothing
        ep._receive("a", encode({"due": now, "t": W.ARRIVAL, "n": "x"}), now)
        for i in range(W.MAX_PENDING + 5):
            ep._receive("a", encode({"due": -float(i + 2), "t": "li", "x": 0}), now)
        return seen, handled, ep.lost_frames, ep.refused, len(ep._pending)

    seen, handled, lost, refused, held = run_loop(main, "virtual")
    assert seen[:2] == [("a", 1), ("a", 2)]
    assert handled == [("a", 1, 0.99)]
    assert (lost, refused, held) == (1, 1, W.MAX_PENDING)
