"""The emulated world of one run, in one process: device agents, the in-process network,
scenario events applied to them, and the emulator's truth (oracle telemetry, the
instrumentation that writes telemetry.csv and links.csv).

This is the test harness around the system under test (the controller and the agents'
protocol): it owns the truth about links, compute and memory, and changes it when a
scenario says so. The controller sees it only through messages, or through `oracle()`
when a scenario asks for oracle telemetry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from ..emulation.link import EmulatedLink
from ..model import cost
from ..model.blocks import WeightSource
from ..model.spec import ModelSpec
from ..placement.problem import DeviceState, Placement, Snapshot
from ..scenario import Event, Scenario
from ..transport.inproc import InprocNetwork
from .device import DeviceAgent

log = logging.getLogger(__name__)

MIB = 1024 * 1024


class UnsupportedEvent(Exception):
    """A scenario action this build cannot emulate yet."""


class Cluster:
    def __init__(self, scenario: Scenario, model: ModelSpec, weights: WeightSource,
                 on_fault: Callable[[str, str], None]) -> None:
        self.scenario = scenario
        self.model = model
        self.loop = asyncio.get_running_loop()
        self.net = InprocNetwork(self.loop, on_fault)
        self.names: list[str] = [d.name for d in scenario.devices]
        self.source = scenario.source
        self.agents: dict[str, DeviceAgent] = {}
        for d in scenario.devices:
            for e in scenario.devices:
                if d.name != e.name:
                    self.net.add_link(d.name, e.name, scenario.network.link(d.name, e.name))
        for d in scenario.devices:
            fixed = cost.source_weight_bytes(model) if d.name == self.source else 0
            agent = DeviceAgent(d, model, weights, self._sender(d.name), self.source,
                                outgoing=self._outgoing(d.name), fixed_bytes=fixed)
            self.agents[d.name] = agent
            self.net.register(d.name, agent.handle)
        for (src, dst), link in self.net.links.items():
            link.on_change = self._alarm(src, dst, link)
        self.base_flops = {d.name: d.flops for d in scenario.devices}

    def _alarm(self, src: str, dst: str, link: EmulatedLink) -> Callable[[float], None]:
        return lambda rate: self.agents[src].link_changed(dst, rate, link.observed_latency())

    def _sender(self, name: str) -> Callable[[str, dict[str, Any]], int]:
        return lambda dst, msg: self.net.send(name, dst, msg)

    def _outgoing(self, name: str) -> Callable[[], dict[str, EmulatedLink]]:
        return lambda: {dst: link for (src, dst), link in self.net.links.items() if src == name}

    @property
    def source_agent(self) -> DeviceAgent:
        return self.agents[self.source]

    def link(self, a: str, b: str) -> EmulatedLink:
        return self.net.link(a, b)

    async def stop(self) -> None:
        for agent in self.agents.values():
            await agent.stop()

    # ------------------------------------------------------------------ events

    def check_supported(self, events: tuple[Event, ...]) -> None:
        for e in events:
            if e.action in ("fail_device", "join_device"):
                raise UnsupportedEvent(
                    f"events[{e.index}]: action {e.action!r} is not supported by this build yet "
                    "(device faults arrive with the websocket transport)")

    def apply(self, e: Event) -> str:
        """Apply a scenario event to the world; returns a short description for events.csv."""
        if e.action == "set_link":
            a, b = e.between  # type: ignore[misc]
            for link in (self.link(a, b), self.link(b, a)):
                link.set(e.bandwidth_mbps, e.latency_ms, e.burst_kib)
            lk = self.link(a, b)
            return f"bandwidth_mbps={lk.bandwidth_mbps:g} latency_ms={lk.latency_ms:g}"
        agent = self.agents[e.device]  # type: ignore[index]
        if e.action == "set_compute":
            agent.compute.factor = e.factor  # type: ignore[assignment]
            return f"factor={e.factor:g} gflops={agent.compute.rate / 1e9:g}"
        if e.action == "memory_pressure":
            want = int(e.take_mib * MIB)  # type: ignore[operator]
            got = agent.budget.take_up_to("pressure", want)
            short = "" if got == want else f" (only {got / MIB:.2f} MiB were free)"
            return f"took_mib={got / MIB:.2f}{short}"
        if e.action == "memory_release":
            held = agent.budget.by_category["pressure"]
            amount = held if e.mib is None else min(held, int(e.mib * MIB))
            agent.budget.release("pressure", amount)
            return f"released_mib={amount / MIB:.2f}"
        raise UnsupportedEvent(f"action {e.action!r} is not supported by the in-process cluster")

    # ------------------------------------------------------------------ truth

    def device_states(self) -> tuple[DeviceState, ...]:
        out = []
        for name in self.names:
            a = self.agents[name]
            out.append(DeviceState.from_memory(name, a.compute.rate, a.budget.counters(), a.spec.host_blocks))
        return tuple(out)

    def link_matrices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        V = len(self.names)
        rate, lat, burst = np.full((V, V), np.inf), np.zeros((V, V)), np.zeros((V, V))
        for i, a in enumerate(self.names):
            for j, b in enumerate(self.names):
                if i != j:
                    lk = self.link(a, b)
                    rate[i, j], lat[i, j], burst[i, j] = lk.bucket.rate, lk.latency, lk.bucket.burst
        return rate, lat, burst

    def oracle(self, seq_len: int, interval: int, current: Placement | None) -> Snapshot:
        rate, lat, burst = self.link_matrices()
        return Snapshot(self.model, self.device_states(), rate, lat, burst,
                        self.names.index(self.source), seq_len, interval, current)
