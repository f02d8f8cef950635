"""What the emulator reads of a device and of a link: the records behind telemetry.csv,
links.csv, oracle telemetry and a run's check of itself.

Owns `MemoryRow`, `DeviceRow` and `LinkRow` and their wire form (an agent process answers
its runner's `state` request with them). Every world returns these records, in process or
not, so a reader sees the same fields whichever world it ran; a field a reader needs is a
field here, never a key that one world sets and another drops. Pure: no asyncio.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, TypeVar

R = TypeVar("R")


class RowError(ValueError):
    """A row from an agent process that does not have the record's fields."""


def _from_wire(cls: type[R], d: Any, what: str) -> R:
    if not isinstance(d, dict):
        raise RowError(f"{what}: expected a mapping, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]  # cls is one of the dataclasses below
    if set(d) != names:
        raise RowError(f"{what}: fields {sorted(set(d) ^ names)} missing or unknown")
    return cls(**d)


@dataclass(frozen=True)
class MemoryRow:
    """A device's memory budget (emulation/memory.py): bytes now and at peak, the limits,
    the events of crossing them (as cgroup v2's memory.events: `high`, `max`, `oom`), and
    the bytes held by each category."""

    current: int
    peak: int
    high: int
    max: int
    oom: int
    max_bytes: int
    high_bytes: int
    fixed_bytes: int
    weights_bytes: int
    kv_bytes: int
    reserved_bytes: int
    pressure_bytes: int
    background_bytes: int

    @classmethod
    def from_wire(cls, d: Any) -> MemoryRow:
        return _from_wire(cls, d, "memory")

    def counters(self) -> dict[str, int]:
        """As `MemoryBudget.counters()` gives them (what `DeviceState.from_memory` reads)."""
        return asdict(self)


@dataclass(frozen=True)
class DeviceRow:
    """A device's truth: memory, caches, weights, compute rate (FLOP/s, slowdowns and
    background load included) and memory bandwidth likewise (0 without one), the jobs it ran,
    how many overran their emulated window and how far past it they ended in all, and the
    share of its window the host needed (95th and 99th percentiles of recent jobs)."""

    device: str
    memory: MemoryRow
    kv_bytes: int
    weights_bytes: int
    compute_flops: float
    jobs: int
    overruns: int
    host_share_p95: float
    host_share_p99: float
    host_blocks: bool
    memory_bandwidth: float = 0.0  # bytes/s, scaled as compute_flops; 0: none (the FLOP model)
    overrun_s: float = 0.0  # emulated seconds its overrun jobs ended past their emulated finish

    def wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: Any) -> DeviceRow:
        row = _from_wire(cls, d, "device row")
        return replace(row, memory=MemoryRow.from_wire(row.memory))


@dataclass(frozen=True)
class LinkRow:
    """One direction of a link: its configured rate and latency, the rate measured from its
    own transfers (None before any), the bytes and frames it carried, how many deliveries
    were checked for lateness and how many were late, and its bucket's parameters in the
    units the placement problem uses (bytes/s, s, bytes)."""

    src: str
    dst: str
    bandwidth_mbps: float
    observed_mbps: float | None
    latency_ms: float
    bytes: int
    delivered: int
    checked: int
    late: int
    rate: float
    latency: float
    burst: float

    def wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: Any) -> LinkRow:
        return _from_wire(cls, d, "link row")
