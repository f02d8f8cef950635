"""A device's memory budget with cgroup-v2-like semantics (pure).

Charged by category: `weights` of hosted blocks, `kv` caches, `reserved` buffers for
incoming migrations, `pressure` taken by a scenario event's co-tenant, `background` held by
the scenario's per-token background load, `fixed` (the source's embedding and LM head). `max` is a hard limit: a charge that would cross it raises
`MemoryRefused` and changes nothing but the counters (`max` and `oom` events). `high` is a
soft limit: crossing it upwards counts a `high` event and shows as pressure in telemetry.
Counters mirror `memory.events` (`high`, `max`, `oom`) plus `current` and `peak`.

Real cgroups are not used: they are not available on every host, and RSS cannot separate
devices that share one process. The budget charges exactly the bytes of the live tensors
(the cost model's numbers, checked against `nbytes` by tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

CATEGORIES = ("fixed", "weights", "kv", "reserved", "pressure", "background")


class MemoryRefused(MemoryError):
    """An allocation that would cross a device's hard limit. Nothing was charged."""

    def __init__(self, device: str, category: str, nbytes: int, current: int, max_bytes: int) -> None:
        self.device, self.category, self.nbytes = device, category, nbytes
        self.current, self.max_bytes = current, max_bytes
        super().__init__(
            f"{device}: {category} allocation of {nbytes} B refused "
            f"({current} B in use, max {max_bytes} B)")


@dataclass
class MemoryBudget:
    device: str
    max_bytes: int
    high_bytes: int
    by_category: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    peak: int = 0
    events_high: int = 0  # times usage crossed high upwards
    events_max: int = 0  # times an allocation hit max
    events_oom: int = 0  # allocations refused
    # signals (the device reports them at once): usage crossed high upwards; a co-tenant
    # took or gave back memory
    on_high: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    on_pressure: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or not 0 < self.high_bytes <= self.max_bytes:
            raise ValueError(f"{self.device}: need 0 < high <= max (got {self.high_bytes}, {self.max_bytes})")

    @property
    def current(self) -> int:
        return sum(self.by_category.values())

    @property
    def available(self) -> int:
        return self.max_bytes - self.current

    @property
    def over_high(self) -> bool:
        return self.current > self.high_bytes

    def fits(self, nbytes: int) -> bool:
        return self.current + nbytes <= self.max_bytes

    def charge(self, category: str, nbytes: int) -> None:
        """Charge nbytes (>= 0) or raise MemoryRefused leaving the charges as they were."""
        if nbytes < 0:
            raise ValueError("charge takes a non-negative size; use release")
        before = self.current
        if before + nbytes > self.max_bytes:
            self.events_max += 1
            self.events_oom += 1
            raise MemoryRefused(self.device, category, nbytes, before, self.max_bytes)
        self.by_category[category] += nbytes
        after = before + nbytes
        self.peak = max(self.peak, after)
        if before <= self.high_bytes < after:
            self.events_high += 1
            if self.on_high is not None:
                self.on_high()
        if category == "pressure" and nbytes and self.on_pressure is not None:
            self.on_pressure()

    def release(self, category: str, nbytes: int) -> None:
        if nbytes < 0 or nbytes > self.by_category[category]:
            raise ValueError(f"{self.device}: cannot release {nbytes} B of {category} "
                             f"(holding {self.by_category[category]} B)")
        self.by_category[category] -= nbytes
        if category == "pressure" and nbytes and self.on_pressure is not None:
            self.on_pressure()

    def hold(self, category: str, nbytes: int) -> None:
        """Set a category to exactly nbytes, past `max` if need be: a co-tenant's memory is
        not ours to refuse, so what no longer fits shows as our next allocation refused
        (the analytic simulation's out-of-memory event). Crossing `high` counts as usual;
        no pressure signal: the load changes every token, and the planner allows for it
        (testbed/placement/window.py)."""
        if nbytes < 0:
            raise ValueError(f"{self.device}: cannot hold {nbytes} B of {category}")
        before = self.current
        self.by_category[category] = nbytes
        after = self.current
        self.peak = max(self.peak, after)
        if before <= self.high_bytes < after:
            self.events_high += 1
            if self.on_high is not None:
                self.on_high()

    def take_up_to(self, category: str, nbytes: int) -> int:
        """Charge as much of nbytes as fits (a co-tenant grabbing memory); returns it."""
        got = max(0, min(nbytes, self.available))
        self.charge(category, got)
        return got

    def counters(self) -> dict[str, int]:
        return {
            "current": self.current, "peak": self.peak, "high": self.events_high,
            "max": self.events_max, "oom": self.events_oom,
            "max_bytes": self.max_bytes, "high_bytes": self.high_bytes,
            **{f"{k}_bytes": v for k, v in self.by_category.items()},
        }
