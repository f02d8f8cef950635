"""The in-process world over real websockets (`--transport ws` without `--processes`).

Same agents, events and truth as `Cluster`, but every agent has its own `WsEndpoint` (an
aiohttp server on loopback) and agents exchange msgpack frames over one websocket per pair,
shaped by the same emulated links at the sender. A failed device's endpoint is closed
abruptly, so its peers see their connections break as they would with a dead process.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable

from ..agents.device import DeviceAgent
from ..emulation.clock import time_scale
from ..emulation.link import EmulatedLink
from ..model.blocks import WeightSource
from ..model.spec import ModelSpec
from ..scenario.records import LinkSpec, Scenario
from ..transport.codec import MAX_FRAME
from ..transport.ws import FRAME_EXTRA, WsEndpoint
from .cluster import Cluster
from .early import compute_early
from .world import retimed, settle_by_wall


class WsCluster(Cluster):
    frame_extra = FRAME_EXTRA  # every frame carries the time it was due

    def __init__(self, scenario: Scenario, model: ModelSpec, weights: WeightSource,
                 on_fault: Callable[[str, str], None]) -> None:
        self.token = secrets.token_urlsafe(24)
        self.endpoints: dict[str, WsEndpoint] = {}
        self.on_fault = on_fault
        super().__init__(scenario, model, weights, on_fault)

    def _connect(self, agent: DeviceAgent) -> None:
        ep = WsEndpoint(agent.name, self.token, max_frame=min(MAX_FRAME, self.bounds.max_frame()))
        ep.handler = agent.handle
        ep.on_peer_down = agent.peer_down
        ep.on_fault = self.on_fault
        ep.retimed = retimed
        self.endpoints[agent.name] = ep
        if time_scale(self.loop) is not None:  # real clock: compute as soon as content arrives
            compute_early(agent, ep)

    def _sender(self, name: str) -> Callable[..., int]:
        return lambda dst, msg, at=None: self.endpoints[name].send(dst, msg, at)

    async def _settle(self, t: float) -> None:
        """Frames cross sockets: a little wall time for the hops."""
        await settle_by_wall(t)

    def _add_link(self, a: str, b: str, spec: LinkSpec) -> EmulatedLink:
        self.endpoints[a].add_peer(b, "", spec)  # the address is known once b listens
        return self.endpoints[a].links[b]

    def links(self) -> dict[tuple[str, str], EmulatedLink]:
        return {(ep.name, peer): link for ep in self.endpoints.values() for peer, link in ep.links.items()}

    async def start(self) -> None:
        for ep in self.endpoints.values():
            if not ep.serving:
                await ep.start()
        for ep in self.endpoints.values():
            for peer in ep.links:
                ep.book[peer] = self.endpoints[peer].url
        alive = [n for n in self.endpoints if n not in self.failed]
        await asyncio.gather(*(self.endpoints[n].connect(alive) for n in alive))

    async def stop(self) -> None:
        await super().stop()
        for ep in self.endpoints.values():
            await ep.close()

    async def frame_counts(self) -> dict[str, int]:
        eps = self.endpoints.values()
        return {"lost": sum(ep.lost_frames for ep in eps),
                "refused": sum(ep.refused for ep in eps) + sum(a.refusals.total for a in self.agents.values())}

    def _kill(self, name: str) -> None:
        self.loop.create_task(self.endpoints[name].close())

    def _announce_down(self, name: str, at: float | None = None) -> None:
        """Nothing to fake: the closed sockets tell the peers."""

    async def _bring_up(self, agent: DeviceAgent) -> None:
        await self.start()  # listen, learn addresses, connect the new pairs
        agent.announce()
