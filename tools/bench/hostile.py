"""`python -m tools.bench.hostile`: an agent process under hostile frames from a token holder.

Starts one device agent (`python -m runners.agent`, device pi-b of scenarios/steady.yaml)
on loopback, connects to it as the other three devices (gateway, the source, loads and
routes layer 1 to it, as a controller would), measures its resident memory, then sends it
batches of hostile frames, each batch of one kind, and after every batch makes a
legitimate request (telemetry from the source) and measures its memory again. Prints per
batch: frames sent, frames the agent counted as refused, resident memory and its change
from the baseline, and how long the legitimate answer took. Target: memory within 10 % of
the baseline after every batch, and every legitimate request answered. Exit status 1 when
either is missed. Everything stays on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import psutil
import torch

from testbed.agents import messages as P
from testbed.scenario import load
from testbed.transport.codec import encode

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "scenarios" / "steady.yaml"
DEVICE = "pi-b"  # sorts last: it dials nobody, the others (us) dial it
TOKEN = "bench-hostile-" + "x" * 24
TARGET = 0.10


class Bench:
    def __init__(self, port: int, pid: int) -> None:
        self.url, self.proc = f"http://127.0.0.1:{port}", psutil.Process(pid)
        self.scen = load(SCENARIO)
        self.s = self.scen.model
        self.session: aiohttp.ClientSession | None = None
        self.ws: dict[str, aiohttp.ClientWebSocketResponse] = {}
        self.rid = 1000
        # every connection is read all the time (that is also when pings are answered)
        self.inbox: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self.readers: list[asyncio.Task[None]] = []

    async def connect(self) -> None:
        self.session = aiohttp.ClientSession()
        self.ctl = await self._ws("/control", {}, "control")
        book = {d.name: "http://127.0.0.1:9" for d in self.scen.devices}
        book[DEVICE] = self.url
        # the agent waits until every peer that sorts before it has dialled: we do
        task = asyncio.ensure_future(self.op("peers", peers=book))
        for name in ("gateway", "phone", "pi-a"):
            self.ws[name] = await self._ws("/peer", {"X-Agent": name}, name)
        assert (await task)["ok"]

    async def _ws(self, path: str, headers: dict[str, str], who: str) -> aiohttp.ClientWebSocketResponse:
        assert self.session is not None
        ws = await self.session.ws_connect(self.url + path, max_msg_size=1 << 26,
                                           headers={"Authorization": f"Bearer {TOKEN}", **headers})
        box = self.inbox.setdefault(who, asyncio.Queue())
        self.readers.append(asyncio.ensure_future(self._read(ws, box)))
        return ws

    @staticmethod
    async def _read(ws: aiohttp.ClientWebSocketResponse, box: asyncio.Queue[dict[str, Any]]) -> None:
        async for m in ws:
            if m.type == aiohttp.WSMsgType.BINARY:
                box.put_nowait(msgpack.unpackb(m.data))

    async def _answer(self, who: str, want: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        box = self.inbox[who]
        while True:
            m = await asyncio.wait_for(box.get(), 60)
            if want(m):
                return m

    async def op(self, op: str, **fields: Any) -> dict[str, Any]:
        self.rid += 1
        rid = self.rid
        await self.ctl.send_bytes(encode({"t": "op", "op": op, "rid": rid, **fields}))
        return await self._answer("control", lambda m: m.get("rid") == rid)

    async def request(self, msg: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """A request from the source (the controller) and its answer, with the time it took."""
        self.rid += 1
        rid = self.rid
        w0 = time.perf_counter()
        ws = self.ws["gateway"]
        if ws.closed:
            raise ConnectionError("the agent closed the source's connection")
        await ws.send_bytes(encode({**msg, "rid": rid}))
        reply = await self._answer("gateway", lambda m: m.get("t") == P.ACK and m.get("rid") == rid)
        return reply, time.perf_counter() - w0

    async def setup(self) -> None:
        """As the controller: layer 1's blocks on this device, routed here."""
        blocks = [b.name for b in self.s.blocks if b.layer == 1]
        assert (await self.request({"t": P.LOAD, "blocks": blocks}))[0]["ok"]
        devices = [d.name for d in self.scen.devices]
        assign = [devices.index(DEVICE) if b.layer == 1 else 0 for b in self.s.blocks]
        assert (await self.request({"t": P.ROUTE, "version": 1, "devices": devices, "assign": assign}))[0]["ok"]

    def rss(self) -> int:
        return self.proc.memory_info().rss

    async def refused(self) -> int:
        return (await self.op("state"))["frames"]["refused"]

    async def send(self, who: str, make: Callable[[int], bytes], n: int) -> None:
        """n frames made one at a time (our own loop must keep answering the agent's pings)."""
        ws = self.ws[who]
        for i in range(n):
            f = make(i)
            await asyncio.sleep(0)
            if ws.closed:  # an oversized frame closes the connection: reconnect as the same peer
                await asyncio.sleep(0.2)
                ws = self.ws[who] = await self._ws("/peer", {"X-Agent": who}, who)
            try:
                await ws.send_bytes(f)
            except ConnectionError:
                await asyncio.sleep(0.2)
                ws = self.ws[who] = await self._ws("/peer", {"X-Agent": who}, who)


def _batches(s: Any, rng: random.Random) -> list[tuple[str, str, Callable[[int], bytes]]]:
    """(kind, who sends it, frame i): each batch sends 1,000 frames of its kind."""
    D, w = s.d_model, s.q_per_group * s.d_head
    x1 = torch.zeros(1, D)
    return [
        ("random bytes", "phone", lambda i: rng.randbytes(rng.randrange(1, 512))),
        ("random msgpack maps", "phone", lambda i: msgpack.packb(
            {rng.choice(["t", "seq", "rid", "x", "layer"]): rng.choice([rng.randrange(-2**63, 2**63), "x", "ack", 1.5])
             for _ in range(4)})),
        ("truncated frames", "phone", lambda i: encode({"t": P.LAYER_INPUT, "seq": 1, "layer": 1, "pos": 0,
                                                       "x": x1})[: rng.randrange(1, 60)]),
        ("abort with seq 2^64-1", "gateway", lambda i: encode({"t": P.ABORT, "rid": i, "seq": 2**64 - 1})),
        ("h with distinct seq", "pi-a", lambda i: encode({"t": P.HEAD_OUTPUTS, "seq": i + 1, "layer": 1, "pos": 0,
                                                         "groups": [0], "out": torch.zeros(16, w)})),
        ("x with distinct seq", "pi-a", lambda i: encode({"t": P.LAYER_INPUT, "seq": i + 1, "layer": 1, "pos": 0,
                                                         "x": torch.zeros(16, D)})),
        ("LAST_HIDDEN of 1,000 rows (1 MiB)", "phone", lambda i: encode({"t": P.LAST_HIDDEN, "seq": 1, "x": torch.zeros(1000, D)})),
        ("negative reservations", "gateway", lambda i: encode({"t": P.RESERVE, "rid": i, "blocks": {"ffn.0": -i}})),
        ("answers without rid", "phone", lambda i: encode({"t": P.ACK, "device": "phone", "ok": True})),
        ("telemetry flood (probes)", "gateway", lambda i: encode({"t": P.TELEMETRY, "rid": 10**6 + i,
                                                                  "probe_bytes": (1 << 20) - 1})),
    ]


CONTROL_BATCH = [  # control operations a token holder might send
    lambda i: {"t": "op", "op": "event", "rid": i, "action": "set_compute", "fields": {"factor": math.nan}},
    lambda i: {"t": "op", "op": "event", "rid": i, "action": "memory_pressure", "fields": {"take_mib": -1}},
    lambda i: {"t": "send", "dst": DEVICE, "msg": {"t": P.ABORT, "rid": i, "seq": 1e308}},
    lambda i: {"t": "send", "dst": DEVICE, "msg": {"t": P.ACK}},
    lambda i: {"t": "op", "op": "explode", "rid": i},
]


async def main_async(batch: int) -> int:
    env = {**os.environ, "TESTBED_RUN_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
    agent = subprocess.Popen([sys.executable, "-m", "runners.agent", "--scenario", str(SCENARIO), "--device", DEVICE],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = agent.stdout.readline() if agent.stdout else ""
        if not line.startswith("READY "):
            print(f"the agent did not start: {line!r}")
            return 1
        b = Bench(int(line.split()[1]), agent.pid)
        await b.connect()
        await b.setup()
        for _ in range(3):  # warm up: the first answers allocate what every later one reuses
            await b.request({"t": P.TELEMETRY, "probe_bytes": 0})
        await asyncio.sleep(0.5)
        base = b.rss()
        print(f"agent {DEVICE} (pid {agent.pid}): baseline resident memory {base / 2**20:.1f} MiB")
        print(f"{'batch':30} {'frames':>7} {'refused':>8} {'RSS MiB':>8} {'change':>7} {'answer ms':>9}")
        rng = random.Random(0)
        worst, missed = 0.0, 0
        runs: list[tuple[str, Callable[[], Any]]] = []
        for kind, who, make in _batches(b.s, rng):
            runs.append((kind, functools.partial(b.send, who, make, batch)))

        async def control_flood() -> None:
            for i in range(batch):
                await b.ctl.send_bytes(encode(CONTROL_BATCH[i % len(CONTROL_BATCH)](i)))

        async def bad_connections() -> None:
            assert b.session is not None
            for _ in range(batch):
                async with b.session.get(b.url + "/peer", headers={"Authorization": "Bearer wrong",
                                                                   "X-Agent": "gateway"}) as r:
                    assert r.status == 401

        runs += [("control operations", control_flood), ("connections without the token", bad_connections)]
        for kind, run in runs:
            before = await b.refused()
            await run()
            try:
                _, took = await b.request({"t": P.TELEMETRY, "probe_bytes": 0})
                answer = f"{took * 1e3:9.1f}"
            except (TimeoutError, ConnectionError) as e:
                answer, missed = f"{'none':>9} ({type(e).__name__})", missed + 1
            await asyncio.sleep(0.3)
            rss = b.rss()
            change = rss / base - 1
            worst = max(worst, change)
            print(f"{kind:30} {batch:>7} {await b.refused() - before:>8} {rss / 2**20:>8.1f} {change:>+7.1%} "
                  f"{answer}", flush=True)
        ok = worst <= TARGET and not missed
        print(f"largest change {worst:+.1%} of the baseline (target {TARGET:.0%}); "
              f"{len(runs) - missed} of {len(runs)} legitimate requests answered: {'met' if ok else 'NOT met'}")
        for t in b.readers:
            t.cancel()
        assert b.session is not None
        await b.session.close()
        return 0 if ok else 1
    finally:
        agent.terminate()
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.hostile", description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=1000, help="frames per batch (default 1000)")
    args = p.parse_args(argv)
    return asyncio.run(main_async(args.frames))


if __name__ == "__main__":
    sys.exit(main())
