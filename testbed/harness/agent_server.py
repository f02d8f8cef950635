"""One device agent behind its own aiohttp server: the agent side of `--processes` and `--attach`.

Owns the agent's process-level shell: the authenticated `/control` websocket through which
the runner (testbed.harness.remote) tells it its peers, scenario events for itself and its
outgoing links, the clock (time scale and epoch) and when to stop; the `/peer` endpoint
shared with the other agents; and the relaying of controller messages when it is the
source device. The device agent itself (testbed.agents.device) knows nothing of this.
`runners/agent.py` is the command line around it.

Every control frame is checked (`control.decode`) before the agent acts on it; a refused
one is answered `ok: false`, counted with the endpoint's refusals (`frames.refused` in the
state report) and logged at most once per second and operation.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web

from ..agents import messages as P
from ..agents.device import DeviceAgent
from ..emulation.clock import LagMonitor
from ..model.blocks import TORCH_THREADS
from ..model.weights import weights_for
from ..scenario.records import DeviceSpec, LinkSpec, Scenario, SetLink, device_change
from ..transport.codec import MAX_FRAME, FrameError, decode, encode
from ..transport.ws import WsEndpoint
from . import control
from .control import (  # by name: the class's `control` method hides the module in annotations
    Op,
    Send,
)
from .early import compute_early
from .world import apply_background, apply_to_device, apply_to_link, device_row, link_row, retimed

log = logging.getLogger("agent")


MAX_REPLIES = 1024  # answers waiting for the runner to read them


def device_spec(scen: Scenario, name: str) -> tuple[DeviceSpec, dict[str, LinkSpec]]:
    """The device (declared, or joining by an event) and its links to named peers."""
    for d in scen.devices:
        if d.name == name:
            return d, {o.name: scen.network.link(name, o.name) for o in scen.devices}
    join = scen.joins().get(name)
    if join is None:
        raise KeyError(name)
    return join.spec, dict(join.links)


class AgentProcess:
    def __init__(self, scen: Scenario, name: str, token: str, host: str, port: int,
                 allow_remote: bool) -> None:
        self.scen = scen
        self.spec, self.links = device_spec(scen, name)
        import torch

        torch.set_num_threads(TORCH_THREADS)
        bounds = P.Bounds.for_run(scen)
        self.ep = WsEndpoint(name, token, host, port, allow_remote, max_frame=min(MAX_FRAME, bounds.max_frame()))
        weights = weights_for(scen.model, scen.seed)
        self.agent = DeviceAgent(self.spec, scen.model, weights, self.ep.send, scen.source,
                                 outgoing=lambda: dict(self.ep.links), bounds=bounds)
        assert bounds.devices is not None
        self.context = control.Context(name, bounds.devices, bounds)
        self.ep.handler = self.agent.handle
        self.ep.retimed = retimed
        self.ep.on_peer_down = self.agent.peer_down
        self.ep.control = self.control
        self.stopped = asyncio.Event()
        self.lag = LagMonitor()
        self.probe_log: list[tuple[str, int | None, int, float]] | None = None  # probe arrivals (benchmarks)
        self.agent.on_probe = self._probe_arrived

    def _probe_arrived(self, sender: str, m: P.Probe, at: float) -> None:
        if self.probe_log is not None and len(self.probe_log) < 1_000_000:
            self.probe_log.append((sender, m.n, len(m.pad), at))

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
                await asyncio.sleep(0)  # see WsEndpoint._serve: others get their turn
                reply = await self._control_frame(msg, out)
                # a peer that does not read its answers gets no more of them (bounded)
                if reply is not None and out.qsize() < MAX_REPLIES:
                    out.put_nowait(encode(reply))
        finally:
            writer.cancel()

    @staticmethod
    async def _write(ws: web.WebSocketResponse, out: asyncio.Queue[bytes]) -> None:
        while True:
            frame = await out.get()
            await ws.send_bytes(frame)

    async def _control_frame(self, msg: Any, out: asyncio.Queue[bytes]) -> dict[str, Any] | None:
        """One frame from the control channel: checked, carried out, answered."""
        if msg.type != WSMsgType.BINARY:
            self._refuse("frame", "a non-binary frame")
            return None
        m: dict[str, Any] | None = None
        try:
            m = decode(msg.data, self.ep.max_frame)
            o = control.decode(m, self.context)
        except (FrameError, control.ControlError) as e:
            what = "frame" if m is None else m.get("op", m.get("t"))
            self._refuse(what if what in control.OPS or what in ("send", "frame") else "?", str(e))
            rid = m.get("rid") if m is not None else None
            return {"t": "re", "rid": rid if isinstance(rid, int) else None, "ok": False, "detail": str(e)}
        try:
            return await self._op(o, out)
        except Exception as e:  # an operation that fails is answered, never fatal
            log.warning("control: %r failed: %s: %s", getattr(o, "op", "send"), type(e).__name__, e)
            return {"t": "re", "rid": getattr(o, "rid", None), "ok": False, "detail": f"{type(e).__name__}: {e}"}

    def _refuse(self, what: str, why: str) -> None:
        self.ep.refusals.refuse("control", what, why, asyncio.get_running_loop().time())

    async def _op(self, o: tuple[Send, ...] | Op, out: asyncio.Queue[bytes]) -> dict[str, Any] | None:
        if isinstance(o, tuple):  # the controller's messages, leaving from this (source) device
            # in one go, as from a source in the controller's process: what the device sends
            # itself among them is handled after all of them (`WsEndpoint.send`)
            for s in o:
                self.agent.send(s.dst, s.msg, s.at)
            return None
        detail = await _OPS[o.op](self, o.fields, out)
        return {"t": "re", "rid": o.rid, "ok": True, **(detail or {})}

    # ---- the operations (control.OPS checked their fields); each returns what its answer adds

    async def _clock(self, m: dict[str, Any], out: asyncio.Queue[bytes]) -> None:
        """The run's timeline: its time scale and epoch (before anything else), or a change
        of scale at Unix time `at` (the host fell behind)."""
        loop = asyncio.get_running_loop()
        loop.set_time_scale(float(m["time_scale"]), float(m["epoch"]), m.get("at"))  # type: ignore[attr-defined]  # the agent's loop is the clock's (clock.run)
        compute_early(self.agent, self.ep)  # agent processes run on the real clock
        if m.get("at") is not None:
            return  # a change of scale during the run: the lag monitor goes on
        self.lag.stop()
        self.lag = LagMonitor()
        self.lag.start()

    async def _peers(self, m: dict[str, Any], out: asyncio.Queue[bytes]) -> None:
        """Know the peers; with `dial`, also connect to them (the runner first tells every
        agent its peers without dialling, so no agent is dialled before it knows the caller)."""
        for peer, url in m["peers"].items():
            if peer != self.spec.name and peer not in self.ep.book:
                self.ep.add_peer(peer, url, self._link_spec(peer))
                link = self.ep.links[peer]
                link.on_change = (lambda p, lk: lambda rate: self.agent.link_changed(
                    p, rate, lk.observed_latency()))(peer, link)
        if m["dial"]:
            await self.ep.connect([p for p in m["peers"] if p != self.spec.name])

    async def _event(self, m: dict[str, Any], out: asyncio.Queue[bytes]) -> dict[str, Any]:
        if m["action"] == SetLink.ACTION:
            change = SetLink((self.spec.name, m["peer"]), **m["fields"])
            at = m.get("at")  # the run's emulated time, shared by every loop of the run
            return {"detail": apply_to_link(self.ep.links[m["peer"]], change,
                                            float(at) if isinstance(at, int | float) else None)}
        return {"detail": apply_to_device(self.agent, device_change(self.spec.name, m["action"], m["fields"]))}

    async def _background(self, m: dict[str, Any], out: asyncio.Queue[bytes]) -> None:
        """This token's background load (testbed/scenario/background.py)."""
        apply_background(self.agent, float(m["memory"]), float(m["compute"]))

    async def _state(self, m: dict[str, Any], out: asyncio.Queue[bytes]) -> dict[str, Any]:
        return {"device": device_row(self.agent).wire(), "lag": self.lag.stats(),
                "frames": {"lost": self.ep.lost_frames, "refused": self.ep.refused + self.agent.refusals.total},
                "links": [link_row(self.spec.name, p, lk).wire() for p, lk in self.ep.links.items()]}

    async def _bulk_op(self, m: dict[str, Any], out: asyncio.Queue[bytes]) -> dict[str, Any]:
        """Benchmark: keep the link to `peer` busy with probes, report timings."""
        return {"transfers": await self._bulk(m["peer"], m["size"], m["count"], m["seconds"])}

    async def _probe_log(self, m: dict[str, Any], out: asyncio.Queue[bytes]) -> dict[str, Any]:
        """Benchmark: time probe arrivals here (on) / hand them over (off)."""
        log_, self.probe_log = self.probe_log, [] if m["on"] else None
        return {"arrivals": [list(x) for x in (log_ or [])]}

    async def _attach(self, m: dict[str, Any], out: asyncio.Queue[bytes]) -> None:
        """Controller-bound messages go to the runner from now on."""
        # with its emulated arrival here, so the controller acts on it as of then
        self.agent.controller = lambda sender, msg, at: out.put_nowait(
            encode({"t": "ctl", "sender": sender, "msg": msg, "at": at}))

    async def _announce(self, m: dict[str, Any], out: asyncio.Queue[bytes]) -> None:
        self.agent.announce()

    async def _stop(self, m: dict[str, Any], out: asyncio.Queue[bytes]) -> None:
        self.stopped.set()

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
                self.agent.send(peer, P.Probe(bytes(size), n).wire())
                n += 1
            await asyncio.sleep(0.0005)
        while link.in_flight and loop.time() < end + 5:
            await asyncio.sleep(0.001)
        rec, link.record = link.record, None
        return [[i, t.size, t.scheduled, t.arrival] for i, t in enumerate(rec)]


# the agent server's one dispatch table: every operation of the control channel (checked by
# control.OPS, which names the same operations) -> what the agent does
_OPS: dict[str, Callable[[AgentProcess, dict[str, Any], asyncio.Queue[bytes]], Awaitable[dict[str, Any] | None]]] = {
    "clock": AgentProcess._clock, "peers": AgentProcess._peers, "event": AgentProcess._event,
    "background": AgentProcess._background, "state": AgentProcess._state, "bulk": AgentProcess._bulk_op,
    "probe_log": AgentProcess._probe_log, "attach": AgentProcess._attach, "announce": AgentProcess._announce,
    "stop": AgentProcess._stop,
}
assert set(_OPS) == set(control.OPS), "the control channel checks operations the agent server does not carry out"


async def serve(scen: Scenario, device: str, token: str, host: str, port: int,
                allow_remote: bool, kernel_links: bool = False) -> None:
    """Serve one agent until the runner (or SIGTERM/SIGINT) stops it; prints `READY <port>`.
    `kernel_links`: the kernel shapes this agent's links (see WsEndpoint.kernel_links)."""
    proc = AgentProcess(scen, device, token, host, port, allow_remote)
    proc.ep.kernel_links = kernel_links
    port = await proc.ep.start()
    proc.lag.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, proc.stopped.set)
    print(f"READY {port}", flush=True)
    await proc.stopped.wait()
    await proc.agent.stop()
    await proc.ep.close()
