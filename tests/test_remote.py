"""Agents in their own processes (`--transport ws --processes`, testbed/harness/remote.py):
an agent killed from outside is a lost device, recovered like `fail_device`; a run that
ends normally records no failure; every time in the result files counts from the run's
start; hostile frames from a token holder in the middle of a run change nothing.

Each test runs the real command line on loopback with a fixed time scale (no calibration)
and bounds every wait."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from .conftest import read_csv, read_json

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "r" * 32
SOURCE = "gateway"  # scenarios/steady.yaml


def _agents(runner: int) -> dict[str, psutil.Process]:
    """The runner's agent processes by device name."""
    out = {}
    for p in psutil.Process(runner).children():
        try:
            cmd = p.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "runners.agent" in cmd:
            out[cmd[cmd.index("--device") + 1]] = p
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def _run(tmp: Path, tokens: int, at_token: int, act: Callable[[int, Path], None]) -> tuple[int, str, Path]:
    """Run steady.yaml with agent processes; once `at_token` tokens are done call
    act(runner pid, run dir); returns (exit status, stderr, run dir)."""
    env = {**os.environ, "TESTBED_RUN_TOKEN": TOKEN}
    runner = subprocess.Popen([sys.executable, "-m", "runners.run", "scenarios/steady.yaml", "--processes",
                               "--tokens", str(tokens), "--time-scale", "10", "--out", str(tmp), "--quiet"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        run_dir = None
        while time.monotonic() < deadline and runner.poll() is None:
            dirs = list((tmp / "steady").glob("*")) if (tmp / "steady").exists() else []
            if dirs and len(_rows(dirs[0] / "tokens.csv")) >= at_token:
                run_dir = dirs[0]
                break
            time.sleep(0.2)
        assert run_dir is not None, f"the run did not reach token {at_token}: {runner.poll()}"
        act(runner.pid, run_dir)
        _, err = runner.communicate(timeout=300)
        return runner.returncode, err, run_dir
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()


def _check_times(run_dir: Path) -> None:
    """Every time counts from the run's start: none negative, none past its end."""
    end = read_json(run_dir / "summary.json")["emulated_s"]
    for name, col in (("events.csv", "t_s"), ("tokens.csv", "t_start_s"), ("telemetry.csv", "t_s"),
                      ("links.csv", "t_s")):
        for row in read_csv(run_dir / name):
            assert 0 <= float(row[col]) <= end + 1e-6, (name, row)
    # and on the tokens' own timeline: an event of token k happens after token k-1 started
    # and before token k+1 starts (a death noticed between tokens carries the last one's
    # number); an offset shorter than the run is caught here too
    tokens = {int(r["token"]): r for r in read_csv(run_dir / "tokens.csv")}
    for row in read_csv(run_dir / "events.csv"):
        k, t = int(row["token"]), float(row["t_s"])
        if k in tokens:
            lo = float(tokens[k - 1]["t_start_s"]) if k - 1 in tokens else 0.0
            hi = float(tokens[k + 1]["t_start_s"]) if k + 1 in tokens else end
            assert lo - 1e-6 <= t <= hi + 1e-6, ("events.csv", row, lo, hi)


def _head_host(run_dir: Path) -> str:
    """A device other than the source that hosts a head now (placements.csv)."""
    where: dict[str, str] = {}
    for row in read_csv(run_dir / "placements.csv"):
        where[row["block"]] = row["device"]
    hosts = sorted({d for b, d in where.items() if b.startswith("head.") and d != SOURCE})
    assert hosts, where
    return hosts[0]


def test_sigkill_of_a_head_hosting_agent_is_recovered(tmp_path: Path) -> None:
    """An agent killed from outside mid-run is a lost device: the run completes (exit 0)
    with the reference's tokens, and events.csv says what happened."""
    killed: list[str] = []

    def kill(runner: int, run_dir: Path) -> None:
        victim = _head_host(run_dir)
        _agents(runner)[victim].send_signal(signal.SIGKILL)
        killed.append(victim)

    status, err, run_dir = _run(tmp_path, tokens=32, at_token=10, act=kill)
    assert status == 0, err
    s = read_json(run_dir / "summary.json")
    assert s["correctness"]["tokens_match"], s["correctness"]
    events = read_csv(run_dir / "events.csv")
    kinds = [(e["kind"], e["subject"]) for e in events]
    assert ("device_failed", killed[0]) in kinds, kinds
    failed_at = kinds.index(("device_failed", killed[0]))
    assert any(k == "recovered" and subj == killed[0] for k, subj in kinds[failed_at:]), kinds
    # only the killed device failed: the others stopping after the last token are not failures
    assert [subj for k, subj in kinds if k == "device_failed"] == killed, kinds
    assert len(s["recover_ms"]) == 1
    assert read_json(run_dir / "meta.json")["status"] == "completed"
    _check_times(run_dir)


def _port(p: psutil.Process) -> int:
    """The port an agent process listens on."""
    (port,) = {c.laddr.port for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    return port


def _hostile(port: int) -> None:
    """As a token holder: answers without a request id to the source, over /peer (refused
    at once: every device's name is connected) and, as a 'send' of the controller's, over
    /control; then an abort far beyond the run."""
    import asyncio

    import aiohttp

    from testbed.transport.codec import encode

    async def main() -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession() as s:
            try:
                peer = await s.ws_connect(f"http://127.0.0.1:{port}/peer", headers={**headers, "X-Agent": "phone"})
                for m in ({"t": "ack"}, {"t": "ack", "device": "phone", "ok": True}, {"t": "err", "kind": "agent"}):
                    await peer.send_bytes(encode(m))
                await peer.close()
            except aiohttp.WSServerHandshakeError as e:
                assert e.status == 409, e
            ctl = await s.ws_connect(f"http://127.0.0.1:{port}/control", headers=headers)
            for m in ({"t": "ack"}, {"t": "ack", "device": SOURCE, "ok": True}):
                await ctl.send_bytes(encode({"t": "send", "dst": SOURCE, "msg": m}))
            await ctl.send_bytes(encode({"t": "send", "dst": "pi-a", "msg": {"t": "abort", "rid": 1, "seq": 2**64 - 1}}))
            await asyncio.sleep(1.0)
            await ctl.close()

    asyncio.run(main())


def test_hostile_frames_mid_run_change_nothing(tmp_path: Path) -> None:
    """Controller-bound frames without `rid` sent by a token holder over /peer and /control
    mid-run: the run completes, records no failure (no device_failed row when the agents
    stop at its end), counts the refusals, and every time in events.csv counts from the
    run's start."""

    def attack(runner: int, run_dir: Path) -> None:
        _hostile(_port(_agents(runner)[SOURCE]))

    status, err, run_dir = _run(tmp_path, tokens=24, at_token=6, act=attack)
    assert status == 0, err
    s = read_json(run_dir / "summary.json")
    assert s["correctness"]["tokens_match"], s["correctness"]
    assert s["frames_refused"] >= 4, s["frames_refused"]
    kinds = [e["kind"] for e in read_csv(run_dir / "events.csv")]
    assert "device_failed" not in kinds and "fault" not in kinds, kinds
    _check_times(run_dir)


def test_sigkill_of_the_source_agent_fails_the_run_promptly(tmp_path: Path) -> None:
    """SIGKILL of the source agent (the controller's port, the embedding and the LM head):
    the run fails within seconds with a one-line reason; every file is closed (meta.json
    not `running`), exit status 1."""
    killed_at: list[float] = []

    def kill(runner: int, run_dir: Path) -> None:
        _agents(runner)[SOURCE].send_signal(signal.SIGKILL)
        killed_at.append(time.monotonic())

    status, err, run_dir = _run(tmp_path, tokens=200, at_token=10, act=kill)
    took = time.monotonic() - killed_at[0]
    assert status == 1, err
    assert took < 60, took
    meta = read_json(run_dir / "meta.json")
    assert meta["status"].startswith(f"failed: {SOURCE}: the source device is lost ("), meta["status"]
    assert "\n" not in meta["status"] and "cannot go on" in meta["status"]
    assert read_json(run_dir / "summary.json")["tokens"] < 200
    assert any(e["kind"] == "fault" and e["subject"] == SOURCE for e in read_csv(run_dir / "events.csv"))
