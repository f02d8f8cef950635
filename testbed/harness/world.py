"""Emulator-side operations on one device, shared by every kind of cluster.

What a scenario event does to a device or to its outgoing links, and how the emulator
reads a device's truth for instrumentation and oracle telemetry. The in-process clusters
call these on their agents directly; an agent process calls them when its runner asks
(`agent_server.py`). One implementation, so every transport emulates the same world.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Collection
from typing import Any

from ..agents import messages as P
from ..agents.device import DeviceAgent
from ..common.stats import percentile
from ..common.units import MIB, bytes_to_mbps
from ..emulation.clock import from_wall, sleep_until
from ..emulation.link import EmulatedLink
from ..scenario.records import DeviceChange, MemoryPressure, MemoryRelease, SetCompute, SetLink
from .rows import DeviceRow, LinkRow, MemoryRow


def apply_to_device(agent: DeviceAgent, change: DeviceChange) -> str:
    """A device's own change (compute rate, co-tenant memory); returns a description."""
    match change:
        case SetCompute(factor=factor):
            agent.compute.factor = factor
            return f"factor={factor:g} gflops={agent.compute.rate / 1e9:g}"
        case MemoryPressure(take_mib=take_mib):
            want = int(take_mib * MIB)
            got = agent.budget.take_up_to("pressure", want)
            short = "" if got == want else f" (only {got / MIB:.2f} MiB were free)"
            return f"took_mib={got / MIB:.2f}{short}"
        case MemoryRelease(mib=mib):
            held = agent.budget.by_category["pressure"]
            amount = held if mib is None else min(held, int(mib * MIB))
            agent.budget.release("pressure", amount)
            return f"released_mib={amount / MIB:.2f}"


def apply_background(agent: DeviceAgent, memory: float, compute: float) -> None:
    """The background load for this token: a co-tenant holds `memory` of the device's memory
    (a share of its hard limit) and takes `compute` of its compute (testbed/scenario/background.py)."""
    agent.budget.hold("background", int(memory * agent.budget.max_bytes))
    agent.compute.load = compute


def apply_to_link(link: EmulatedLink, change: SetLink, at: float | None = None) -> str:
    """set_link on one direction of a link, as of emulated time `at` (default now); returns
    a description."""
    link.set(change.bandwidth_mbps, change.latency_ms, change.burst_kib, at)
    return f"bandwidth_mbps={link.bandwidth_mbps:g} latency_ms={link.latency_ms:g}"


# real clock, across sockets: the wall time the host may take to carry a report to the
# controller (socket and relay hops measured at p99 1-2.4 ms, at most 8.5 ms:
# docs/fidelity.md); every wall second waited is 1/K emulated seconds the devices lose
SOCKET_SETTLE_WALL_S = 0.01


async def settle_by_wall(t: float, wall_s: float = SOCKET_SETTLE_WALL_S) -> None:
    """`Port.settle` where the transport cannot see the frames in flight (websockets, agent
    processes): give the host `wall_s` of wall time past emulated time `t` to carry them."""
    await sleep_until(t + from_wall(wall_s, asyncio.get_running_loop()))


def retimed(msg: dict[str, Any]) -> bool:
    """Data messages: their receiver acts on them as of their due time (a job starts when
    its input was due), so a delivery the host runs late does not delay the emulated
    system. Control messages (acknowledgements, telemetry, reports) are acted on as of
    their due time too (a device answers as of the request's arrival, the controller moves
    its instant to the answer's: agents/timeline.py), but their late deliveries are still
    counted (`late_delivery_fraction`): the controller's wake-ups and the relays between
    processes are where the host's delay shows on the control path."""
    return msg.get("t") in P.DATA


def device_row(agent: DeviceAgent) -> DeviceRow:
    """The device's truth (rows.DeviceRow)."""
    c = agent.compute
    return DeviceRow(agent.name, MemoryRow(**agent.budget.counters()), agent.kv_bytes(), agent.weight_bytes(),
                     c.rate, c.jobs, c.overruns, share(c.host_shares, 95), share(c.host_shares, 99),
                     agent.spec.host_blocks, c.bandwidth if math.isfinite(c.bandwidth) else 0.0, c.overrun_s)


def share(xs: Collection[float], q: float) -> float:
    """The q-th percentile of the shares of their windows that jobs needed; 0 before any."""
    return percentile(xs, q) if xs else 0.0


def link_row(src: str, dst: str, link: EmulatedLink) -> LinkRow:
    obs = link.observed_rate()
    return LinkRow(src, dst, link.bandwidth_mbps, bytes_to_mbps(obs) if obs is not None else None, link.latency_ms,
                   link.bytes_sent, link.delivered, link.checked, link.late, link.bucket.rate, link.latency,
                   link.bucket.burst)
