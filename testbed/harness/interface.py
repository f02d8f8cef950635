"""The one interface of every emulated world: what a run (testbed/experiments/run.py) asks of
the cluster it drives, whichever kind it is.

Implemented by `Cluster` (agents in this process over in-process queues), `WsCluster`
(the same over real websockets on loopback) and `ProcessCluster` (agents in their own
processes, or attached on other hosts); tests/test_harness.py checks each against it.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable

from ..agents.parts import Port
from ..placement.problem import Placement, Snapshot
from ..scenario.records import Event
from .rows import DeviceRow, LinkRow


@runtime_checkable
class World(Protocol):
    frame_extra: int  # bytes the transport adds to every frame (priced by the estimate)
    loop: asyncio.AbstractEventLoop  # the run's loop: its time is emulated time
    failed: set[str]  # devices failed by a scenario event

    async def start(self) -> None:
        """Bring every agent up and connect them."""

    async def stop(self) -> None:
        """Stop every agent (and its process); nothing is left running."""

    def port(self) -> Port:
        """The controller's port on the source device."""

    async def oracle(self, seq_len: int, interval: int, current: Placement | None) -> Snapshot:
        """The emulator's truth as a snapshot (oracle telemetry)."""

    async def apply(self, e: Event, at: float | None = None) -> str:
        """Apply a scenario event; a short description for events.csv. `at`: the emulated
        instant it takes effect as of, when that lies a little in the past (a token's
        start, which the host reaches later on the real clock); links honour it."""

    async def background(self, loads: dict[str, tuple[float, float]]) -> None:
        """This token's background load: device -> (memory share, compute share)."""

    async def device_rows(self) -> list[DeviceRow]:
        """Instrumentation: per live device its memory, caches, weights and compute."""

    async def link_rows(self) -> list[LinkRow]:
        """Instrumentation: per link between live devices its configured and measured state."""

    async def frame_counts(self) -> dict[str, int]:
        """Frames `lost` (to or from failed devices) and `refused` (malformed) so far."""

    def pids(self) -> dict[str, int]:
        """Process ids of the live agents that run in processes of their own (none in process)."""
