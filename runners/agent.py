"""`python -m runners.agent --scenario FILE --device NAME`: one device agent in its own process.

The runner starts one per device with `--processes` (and stops them); for runs across
several hosts, start them by hand on each host with the same scenario file and run token
and give the runner their addresses (README, "Agents on several hosts").

The agent listens on 127.0.0.1 (another address only with `--allow-remote`), prints
`READY <port>` on stdout once it listens, and then does what its runner asks over the
authenticated `/control` websocket: learn its peers and connect to them, apply scenario
events to itself and its outgoing links, report its state, relay the controller's
messages when it is the source device, and stop. The run token comes from the
environment variable TESTBED_RUN_TOKEN (never from the command line, where other users
could read it); without it the agent refuses to start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from aiohttp import WSMsgType, web

from testbed.agents.device import DeviceAgent
from testbed.agents.world import apply_to_device, apply_to_link, device_row, link_row, retimed
from testbed.emulation.clock import CLOCKS, LagMonitor
from testbed.emulation.clock import run as run_loop
from testbed.experiment import TORCH_THREADS
from testbed.model.blocks import weights_for
from testbed.scenario import DeviceSpec, LinkSpec, Scenario, ScenarioError, load
from testbed.transport.codec import FrameError, decode, encode
from testbed.transport.ws import WsEndpoint

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


async def serve(args: argparse.Namespace, scen: Scenario, token: str) -> None:
    proc = AgentProcess(scen, args.device, token, args.host, args.port, args.allow_remote)
    port = await proc.ep.start()
    proc.lag.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, proc.stopped.set)
    print(f"READY {port}", flush=True)
    await proc.stopped.wait()
    await proc.agent.stop()
    await proc.ep.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runners.agent", description=__doc__.split("\n")[0])
    p.add_argument("--scenario", required=True, help="the run's scenario file")
    p.add_argument("--device", required=True, help="this agent's device name")
    p.add_argument("--seed", type=int, help="the run's seed (as given to the runner)")
    p.add_argument("--tokens", type=int, help="the run's --tokens (as given to the runner)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default: any free one)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow listening on an address other than loopback (runs across hosts)")
    p.add_argument("--clock", choices=CLOCKS, default="real", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s {args.device}: %(message)s")
    token = os.environ.get(TOKEN_ENV, "")
    if len(token) < 16:
        print(f"error: set {TOKEN_ENV} to the run's token (at least 16 characters)", file=sys.stderr)
        return 2
    try:
        scen = load(args.scenario).with_overrides(seed=args.seed, new_tokens=args.tokens)
        device_spec(scen, args.device)
    except ScenarioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyError:
        print(f"error: {args.scenario}: no device {args.device!r} (declared or joining)", file=sys.stderr)
        return 2
    try:
        run_loop(lambda: serve(args, scen, token), "real")
    except ValueError as e:  # e.g. a non-loopback address without --allow-remote
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
