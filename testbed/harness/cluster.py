"""The emulated world of one run in one process: device agents, the network between them
(in-process queues, or real websockets on loopback), scenario events applied to them, and
the emulator's truth (oracle telemetry, the instrumentation behind telemetry.csv and
links.csv).

This is the harness around the system under test (the controller and the agents'
protocol): it owns the truth about links, compute, memory and device presence, and changes
it when a scenario says so. The controller sees it only through messages (its `Port`), or
through `oracle()` when a scenario asks for oracle telemetry. Every kind of world implements
`interface.World`; `remote.py` does so for agents that run in their own processes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from ..agents import messages as P
from ..agents.device import DeviceAgent
from ..emulation.clock import time_scale
from ..emulation.link import EmulatedLink
from ..model.blocks import WeightSource
from ..model.spec import ModelSpec
from ..placement.problem import DeviceState, Placement, Snapshot, link_matrices
from ..scenario.records import (
    DeviceSpec,
    Event,
    FailDevice,
    JoinDevice,
    LinkSpec,
    MemoryPressure,
    MemoryRelease,
    Scenario,
    SetCompute,
    SetLink,
)
from ..transport.inproc import InprocNetwork
from .rows import DeviceRow, LinkRow
from .world import apply_background, apply_to_device, apply_to_link, device_row, link_row, retimed

log = logging.getLogger(__name__)


class UnsupportedEvent(Exception):
    """A scenario action this world cannot emulate."""


class AgentPort:
    """The controller's port on an in-process source agent; `settle` is the network's."""

    def __init__(self, agent: DeviceAgent, settle: Callable[[float], Awaitable[None]]) -> None:
        self.agent = agent
        self.source = agent.name
        self._settle = settle

    async def settle(self, t: float) -> None:
        await self._settle(t)

    def send(self, dst: str, msg: dict[str, Any], at: float | None = None) -> None:
        self.agent.send(dst, msg, at)

    def attach(self, handler: Callable[[str, dict[str, Any], float | None], None]) -> None:
        self.agent.controller = handler


class Cluster:
    """Agents in this process, over `InprocNetwork` (or `WsNetwork` when transport="ws")."""


    def __init__(self, scenario: Scenario, model: ModelSpec, weights: WeightSource,
                 on_fault: Callable[[str, str], None], framing: int = 0) -> None:
        """`framing`: bytes every link charges on every frame beyond its own, a transport's
        framing that in-process frames lack (the websocket transport's `due` entry: the
        virtual twin of a run over websockets); the estimate prices them too."""
        self.scenario = scenario
        self.model = model
        self.weights = weights
        self.loop = asyncio.get_running_loop()
        # bytes the links charge on every frame beyond its own: none for the in-process
        # transport (it sends the message itself), `framing` for a websocket run's twin
        self.frame_extra = framing
        self.net = InprocNetwork(self.loop, on_fault, framing)
        self.net.retimed = retimed
        self.names: list[str] = []
        self.source = scenario.source
        self.agents: dict[str, DeviceAgent] = {}
        self.failed: set[str] = set()
        self.bounds = P.Bounds.for_run(scenario)  # what every agent accepts
        for d in scenario.devices:
            self._add(d, {o.name: scenario.network.link(d.name, o.name) for o in scenario.devices})

    def _add(self, d: DeviceSpec, links: dict[str, LinkSpec]) -> DeviceAgent:
        agent = DeviceAgent(d, self.model, self.weights, self._sender(d.name), self.source,
                            outgoing=self._outgoing(d.name), bounds=self.bounds)
        self.agents[d.name] = agent
        self._connect(agent)
        for other in self.names:
            spec = links.get(other, self.scenario.network.default)
            for a, b in ((d.name, other), (other, d.name)):
                link = self._add_link(a, b, spec)
                link.on_change = self._alarm(a, b, link)
        self.names.append(d.name)
        return agent

    # the in-process network; WsCluster overrides these four
    def _connect(self, agent: DeviceAgent) -> None:
        self.net.register(agent.name, agent.handle)
        if time_scale(self.loop) is not None:  # real clock: compute as soon as content arrives
            agent.compute_early()
            self.net.previews[agent.name] = agent.preview
            agent.early_send = lambda dst, msg, src=agent.name: self.net.preview(src, dst, msg)

    def _add_link(self, a: str, b: str, spec: LinkSpec) -> EmulatedLink:
        return self.net.add_link(a, b, spec)

    def links(self) -> dict[tuple[str, str], EmulatedLink]:
        return self.net.links

    def _kill(self, name: str) -> None:
        self.net.kill(name)

    def _alarm(self, src: str, dst: str, link: EmulatedLink) -> Callable[[float], None]:
        def fire(rate: float) -> None:
            if src not in self.failed:
                self.agents[src].link_changed(dst, rate, link.observed_latency())

        return fire

    def _sender(self, name: str) -> Callable[..., int]:
        return lambda dst, msg, at=None: self.net.send(name, dst, msg, at)

    def _outgoing(self, name: str) -> Callable[[], dict[str, EmulatedLink]]:
        return lambda: {dst: link for (src, dst), link in self.links().items()
                        if src == name and dst not in self.failed}

    def port(self) -> AgentPort:
        return AgentPort(self.agents[self.source], self._settle)

    async def _settle(self, t: float) -> None:
        """In process the network sees every frame in flight (the websocket cluster overrides this)."""
        await self.net.settle(t)

    def link(self, a: str, b: str) -> EmulatedLink:
        return self.links()[(a, b)]

    async def start(self) -> None:
        """Nothing to connect in process (the websocket cluster overrides this)."""

    async def stop(self) -> None:
        for agent in self.agents.values():
            await agent.stop()

    # ------------------------------------------------------------------ events

    async def apply(self, e: Event, at: float | None = None) -> str:
        """Apply a scenario event to the world (links as of `at`); returns a short
        description for events.csv."""
        match e.change:
            case SetLink(between=(a, b)) as c:
                apply_to_link(self.link(b, a), c, at)
                return apply_to_link(self.link(a, b), c, at)
            case JoinDevice(spec=spec, links=links):
                agent = self._add(spec, links)
                await self._bring_up(agent)
                return f"compute_gflops={spec.compute_gflops:g} memory_mib={spec.memory_mib:g}"
            case FailDevice(device=name):
                self.fail(name, at)
                return "the device stopped: its blocks and caches are gone"
            case SetCompute() | MemoryPressure() | MemoryRelease() as c:
                return apply_to_device(self.agents[c.device], c)
        raise UnsupportedEvent(f"action {e.action!r} is not supported by the in-process cluster")

    async def background(self, loads: dict[str, tuple[float, float]]) -> None:
        """The background load for this token: device -> (memory share, compute share)."""
        for name, (memory, compute) in loads.items():
            if name not in self.failed:
                apply_background(self.agents[name], memory, compute)

    async def _bring_up(self, agent: DeviceAgent) -> None:
        """A joined agent is reachable: it introduces itself to the controller."""
        agent.announce()

    def fail(self, name: str, at: float | None = None) -> None:
        """The device dies abruptly as of loop time `at` (default now): its state is gone,
        frames to and from it are lost, and its peers see their connections break after the
        link latency."""
        if name == self.source:
            raise UnsupportedEvent("the source device runs the controller and cannot fail")
        agent = self.agents[name]
        self.failed.add(name)
        self._kill(name)
        agent.halt()
        self._announce_down(name, at)

    def _announce_down(self, name: str, at: float | None = None) -> None:
        """In process nothing breaks by itself: the source sees the connection reset the
        link latency after the failure (as of `at`), as TCP would show it, and tells the
        controller when that was due."""
        src = self.agents[self.source]
        due = (self.loop.time() if at is None else at) + self.link(name, self.source).latency
        self.loop.call_at(due, src.peer_down, name, due)

    # ------------------------------------------------------------------ truth

    def device_states(self) -> tuple[DeviceState, ...]:
        out = []
        for name in self.names:
            a = self.agents[name]
            out.append(DeviceState.from_memory(name, a.compute.rate, a.budget.counters(), a.spec.host_blocks,
                                               alive=name not in self.failed, bandwidth=a.compute.bandwidth))
        return tuple(out)

    def link_matrices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        links = []
        for i, a in enumerate(self.names):
            for j, b in enumerate(self.names):
                if i != j:
                    lk = self.link(a, b)
                    links.append((i, j, lk.bucket.rate, lk.latency, lk.bucket.burst))
        return link_matrices(len(self.names), links)

    async def oracle(self, seq_len: int, interval: int, current: Placement | None) -> Snapshot:
        return Snapshot.build(self.model, self.device_states(), self.link_matrices(),
                              self.names.index(self.source), seq_len, interval, current)

    async def device_rows(self) -> list[DeviceRow]:
        """Instrumentation: per live device its memory, caches, weights and compute."""
        return [device_row(self.agents[n]) for n in self.names if n not in self.failed]

    async def frame_counts(self) -> dict[str, int]:
        """Frames lost (to or from a failed device) and messages refused so far."""
        return {"lost": self.net.lost_frames, "refused": sum(a.refusals.total for a in self.agents.values())}

    def pids(self) -> dict[str, int]:
        return {}  # every agent runs in this process

    async def link_rows(self) -> list[LinkRow]:
        return [link_row(src, dst, lk) for (src, dst), lk in self.links().items()
                if src not in self.failed and dst not in self.failed]
