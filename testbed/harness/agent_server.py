"""One device agent behind its own aiohttp server: the agent side of `--processes` and `--attach`.

Owns the agent's process-level shell: the authenticated `/control` websocket through which
the runner (testbed.harness.remote) tells it its peers, scenario events for itself and its
outgoing links, the clock (time scale and epoch) and when to stop; the `/peer` endpoint
shared with the other agents; and the relaying of controller messages when it is the
source device. The device agent itself (testbed.agents.device) knows nothing of this.
`runners/agent.py` is the command line around it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from aiohttp import WSMsgType, web

from ..agents.device import DeviceAgent
from ..emulation.clock import LagMonitor
from ..experiment import TORCH_THREADS
from ..model.weights import weights_for
from ..scenario import DeviceSpec, LinkSpec, Scenario
from ..transport.codec import FrameError, decode, encode
from ..transport.ws import WsEndpoint
from .world import apply_background, apply_to_device, apply_to_link, device_row, link_row, retimed

log = logging.getLogger("agent")


TOKEN_ENV = "TESTBED_RUN_TOKEN"


def device_spec(scen: Scenario, name: str) -> tuple[DeviceSpec, dict[str, LinkSpec]]:
    """The device (declared, or joining by an event) and its links to named peers."""
    for d in scen.devices:
        if d.name == name:
            return d, {o.name: scen.network.link(name, o.name) for o in scen.devices}
    for e in scen.events:
        if e.action == "join_device" and e.join is not None and e.join.name == name:
            return e.join, dict(e.join_links or {})
    raise KeyError(name)


class AgentProcess:
    def __init__(self, scen: Scenario, name: str, token: str, host: str, port: int,
                 allow_remote: bool) -> None:
        self.scen = scen
        self.spec, self.links = device_spec(scen, name)
        import torch

        torch.set_num_threads(TORCH_THREADS)
        self.ep = WsEndpoint(name, token, host, port, allow_remote)
        weights = weights_for(scen.model, scen.seed)
        self.agent = DeviceAgent(self.spec, scen.model, weights, self.ep.send, scen.source,
                                 outgoing=lambda: dict(self.ep.links))
        self.ep.handler = self.agent.handle
        self.ep.retimed = retimed
        self.ep.on_peer_down = self.agent.peer_down
        self.ep.control = self.control
        self.stopped = asyncio.Event()
        self.lag = LagMonitor()

    def _link_spec(self, peer: str) -> LinkSpec:
        if peer in self.links:
            return self.links[peer]
        # a device that joined after us: its join event says how it is linked to us
        try:
            _, theirs = device_spec(self.scen, peer)
        except KeyError:
            theirs = {}
        return theirs.get(self.spec.name, self.scen.network.default)

    async def control(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        out: asyncio.Queue[bytes] = asyncio.Queue()
        writer = asyncio.get_running_loop().create_task(self._write(ws, out))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY:
                    log.warning("control: refused a non-binary frame")
                    continue
                try:
                    m = decode(msg.data)
                except FrameError as e:
                    log.warning("control: refused a frame: %s", e)
                    continue
                try:
                    reply = await self._op(m, out)
                except Exception as e:  # a bad request is answered, never fatal
                    log.warning("control: refused %r: %s", m.get("op", m.get("t")), e)
                    reply = {"t": "re", "rid": m.get("rid"), "ok": False, "detail": f"{type(e).__name__}: {e}"}
                if reply is not None:
                    out.put_nowait(encode(reply))
        finally:
            writer.cancel()

    @staticmethod
    async def _write(ws: web.WebSocketResponse, out: asyncio.Queue[bytes]) -> None:
        while True:
            frame = await out.get()
            await ws.send_bytes(frame)

    async def _op(self, m: dict[str, Any], out: asyncio.Queue[bytes]) -> dict[str, Any] | None:
        t = m["t"]
        if t == "send":  # the controller's message, leaving from this (source) device
            self.agent.send(m["dst"], m["msg"])
            return None
        op, rid = m["op"], m["rid"]
        ok: dict[str, Any] = {"t": "re", "rid": rid, "ok": True}
        if op == "clock":  # the run's timeline: its time scale and epoch (before anything else)
            loop = asyncio.get_running_loop()
            loop.set_time_scale(float(m["time_scale"]), float(m["epoch"]))  # type: ignore[attr-defined]
            self.lag.stop()
            self.lag = LagMonitor()
            self.lag.start()
            return ok
        if op == "peers":
            for peer, url in m["peers"].items():
                if peer != self.spec.name and peer not in self.ep.book:
                    self.ep.add_peer(peer, url, self._link_spec(peer))
                    link = self.ep.links[peer]
                    link.on_change = (lambda p, lk: lambda rate: self.agent.link_changed(
                        p, rate, lk.observed_latency()))(peer, link)
            await self.ep.connect([p for p in m["peers"] if p != self.spec.name])
            return ok
        if op == "event":
            if m["action"] == "set_link":
                return {**ok, "detail": apply_to_link(self.ep.links[m["peer"]], m["fields"])}
            return {**ok, "detail": apply_to_device(self.agent, m["action"], m["fields"])}
        if op == "background":  # this token's background load (testbed/background.py)
            apply_background(self.agent, float(m["memory"]), float(m["compute"]))
            return ok
        if op == "state":
            return {**ok, "device": device_row(self.agent), "lag": self.lag.stats(),
                    "frames": {"lost": self.ep.lost_frames, "refused": self.ep.refused},
                    "links": [link_row(self.spec.name, p, lk) for p, lk in self.ep.links.items()]}
        if op == "bulk":  # benchmark: keep the link to `peer` busy with probes, report timings
            return {**ok, "transfers": await self._bulk(m["peer"], m["size"], m["count"], m["seconds"])}
        if op == "probe_log":  # benchmark: time probe arrivals here (on) / hand them over (off)
            log_, self.agent.probe_log = self.agent.probe_log, [] if m["on"] else None
            return {**ok, "arrivals": [list(x) for x in (log_ or [])]}
        if op == "attach":  # controller-bound messages go to the runner from now on
            self.agent.controller = lambda sender, msg: out.put_nowait(
                encode({"t": "ctl", "sender": sender, "msg": msg}))
            return ok
        if op == "announce":
            self.agent.announce()
            return ok
        if op == "stop":
            self.stopped.set()
            return ok
        raise ValueError(f"unknown control operation {op!r}")


    async def _bulk(self, peer: str, size: int, count: int, seconds: float) -> list[list[float]]:
        """Send up to `count` probes of `size` bytes to `peer` within `seconds`, keeping a
        few frames queued so the link never idles; returns (n, size, scheduled, delivered)
        per frame as the sender's link saw them."""
        link = self.ep.links[peer]
        link.record = []
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        n = 0
        while n < count and loop.time() < end:
            while link.bucket.queued < 4 and n < count:  # never idle: a few frames always wait
                self.agent.send(peer, {"t": "probe", "pad": bytes(size), "n": n})
                n += 1
            await asyncio.sleep(0.0005)
        while link.in_flight and loop.time() < end + 5:
            await asyncio.sleep(0.001)
        rec, link.record = link.record, None
        return [[i, t.size, t.scheduled, t.arrival] for i, t in enumerate(rec)]


async def serve(scen: Scenario, device: str, token: str, host: str, port: int,
                allow_remote: bool) -> None:
    """Serve one agent until the runner (or SIGTERM/SIGINT) stops it; prints `READY <port>`."""
    proc = AgentProcess(scen, device, token, host, port, allow_remote)
    port = await proc.ep.start()
    proc.lag.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, proc.stopped.set)
    print(f"READY {port}", flush=True)
    await proc.stopped.wait()
    await proc.agent.stop()
    await proc.ep.close()
