"""What the controller believes about the cluster under measured telemetry (pure).

Owns the estimates behind a `Snapshot` when the controller cannot read the emulator's
truth: per device its memory counters and measured compute rate, per link the rate its
frames streamed at and its latency, and which devices are gone. It ingests reports
(telemetry answers, pressure and link-rate alarms, the memory numbers of a refused
allocation) and keeps, per device, only the freshest by the device's own clock. Links
start from the scenario's nominal values; a link nobody has observed keeps its estimate.
No asyncio, no IO: messages come in as dictionaries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from ..model.spec import ModelSpec
from ..placement.problem import DeviceState, Placement, Snapshot
from ..scenario.records import LinkSpec


class Beliefs:
    def __init__(self, model: ModelSpec, source: str) -> None:
        self.model = model
        self.source = source
        self.names: list[str] = []
        self.host: list[bool] = []
        self.states: list[DeviceState | None] = []
        self.at: list[float] = []
        self.alive: list[bool] = []
        self.rate = np.zeros((0, 0))
        self.lat = np.zeros((0, 0))

    def add_device(self, name: str, host_blocks: bool, links: dict[str, LinkSpec]) -> int:
        """A device (at start or joining): nominal links to every known device, both ways."""
        i = len(self.names)
        self.names.append(name)
        self.host.append(host_blocks)
        self.states.append(None)
        self.at.append(-math.inf)
        self.alive.append(True)
        V = i + 1
        rate, lat = np.full((V, V), np.inf), np.zeros((V, V))
        rate[:i, :i], lat[:i, :i] = self.rate, self.lat
        for j, other in enumerate(self.names[:i]):
            spec = links[other]
            rate[i, j] = rate[j, i] = spec.rate_bytes
            lat[i, j] = lat[j, i] = spec.latency_s
        self.rate, self.lat = rate, lat
        return i

    def index(self, name: str) -> int:
        return self.names.index(name)

    def alive_names(self) -> list[str]:
        """The devices believed alive, in order."""
        return [d for d, a in zip(self.names, self.alive, strict=True) if a]

    @property
    def ready(self) -> bool:
        return all(s is not None for s, a in zip(self.states, self.alive, strict=True) if a)

    # ---------------------------------------------------------------- reports

    def memory(self, device: str, mem: Mapping[str, int], at: float, flops: float | None = None) -> None:
        """Fresh memory counters (and maybe compute rate) from a device, if newer."""
        i = self.index(device)
        if at < self.at[i]:
            return
        self.at[i] = at
        old = self.states[i]
        rate = flops if flops is not None else (old.flops if old is not None else math.nan)
        self.states[i] = DeviceState.from_memory(device, rate, mem, self.host[i], self.alive[i])

    def telemetry(self, device: str, reply: Mapping[str, Any]) -> None:
        """A device's answer to a telemetry request (`Ack.reply`): its links and memory."""
        i = self.index(device)
        for peer, obs in reply["links"].items():
            if peer not in self.names:
                continue
            j = self.index(peer)
            if obs["rate"] is not None:
                self.rate[i, j] = obs["rate"]
            if obs["latency"] is not None:
                self.lat[i, j] = obs["latency"]
        self.memory(device, reply["memory"], reply["at"], float(reply["flops"]))

    def link(self, src: str, dst: str, rate: float, latency: float | None) -> None:
        """A rate alarm from src about its link to dst. Links usually change both ways at
        once (a radio, a cable), and the other direction may carry nothing to notice it
        with: it is assumed to match until a measurement of its own says otherwise."""
        i, j = self.index(src), self.index(dst)
        for a, b in ((i, j), (j, i)):
            self.rate[a, b] = rate
            if latency is not None:
                self.lat[a, b] = latency

    def lost(self, device: str) -> None:
        i = self.index(device)
        self.alive[i] = False
        st = self.states[i]
        if st is not None:
            self.states[i] = replace(st, alive=False)

    def revive(self, device: str) -> None:
        i = self.index(device)
        self.alive[i] = True
        st = self.states[i]
        if st is not None:
            self.states[i] = replace(st, alive=True)

    # ---------------------------------------------------------------- snapshot

    def snapshot(self, seq_len: int, interval: int, current: Placement | None) -> Snapshot:
        devices = []
        for i, name in enumerate(self.names):
            st = self.states[i]
            if st is None:  # never heard of (yet): unusable for now
                st = DeviceState(name, 1.0, 0, self.host[i], False)
            devices.append(st)
        return Snapshot.build(self.model, devices, (self.rate.copy(), self.lat.copy()), self.index(self.source),
                              seq_len, interval, current)
