"""Scenario files (YAML, version 1): parsing into frozen dataclasses, strict validation.

Owns the scenario format of DESIGN.md section 6 and `ScenarioError`, whose message names the
file and the key path (`devices[1].memory_mib: must be > 0`). Pure: reads one file, no
asyncio, no torch. The runner prints a ScenarioError on one line and exits with status 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model.spec import ModelSpec

MIB = 1024 * 1024


class ScenarioError(ValueError):
    """A scenario file that cannot be run. `str()` is one line: `FILE: key.path: what`."""

    def __init__(self, file: str, path: str, message: str) -> None:
        self.file, self.path, self.message = file, path, message
        where = f"{file}: {path}: " if path else f"{file}: "
        super().__init__(f"{where}{message}")


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    compute_gflops: float
    memory_mib: float
    memory_high_mib: float  # resolved: default 90 % of memory_mib
    host_blocks: bool = True

    @property
    def flops(self) -> float:
        return self.compute_gflops * 1e9

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_mib * MIB)

    @property
    def memory_high_bytes(self) -> int:
        return int(self.memory_high_mib * MIB)


@dataclass(frozen=True)
class LinkSpec:
    bandwidth_mbps: float
    latency_ms: float
    burst_kib: float = 0.0

    @property
    def rate_bytes(self) -> float:
        """Bytes per second."""
        return self.bandwidth_mbps * 1e6 / 8

    @property
    def latency_s(self) -> float:
        return self.latency_ms / 1e3

    @property
    def burst_bytes(self) -> float:
        return self.burst_kib * 1024


@dataclass(frozen=True)
class NetworkSpec:
    default: LinkSpec
    # symmetric overrides, keyed by the sorted device pair
    links: dict[tuple[str, str], LinkSpec] = field(default_factory=dict)

    def link(self, a: str, b: str) -> LinkSpec:
        return self.links.get((a, b) if a <= b else (b, a), self.default)


@dataclass(frozen=True)
class GenerationSpec:
    new_tokens: int
    prompt_tokens: int = 0  # length of a seeded random prompt
    prompt: str | None = None  # text, for models that carry a tokenizer


@dataclass(frozen=True)
class ControllerSpec:
    algorithm: str = "resource_aware"
    interval_tokens: int = 4
    telemetry: str = "measured"  # measured | oracle


@dataclass(frozen=True)
class Event:
    """One scenario event. Exactly one of at_token / at_s is set. Fields that an action
    does not use are None. `index` is the event's position in the file (for messages and
    for a stable order among events with the same trigger)."""

    index: int
    action: str  # set_link | set_compute | memory_pressure | memory_release | fail_device | join_device
    at_token: int | None = None
    at_s: float | None = None
    device: str | None = None  # set_compute, memory_*, fail_device; join_device: the new name
    between: tuple[str, str] | None = None  # set_link
    bandwidth_mbps: float | None = None  # set_link (0 takes the link down)
    latency_ms: float | None = None  # set_link (None: unchanged)
    burst_kib: float | None = None  # set_link (None: unchanged)
    factor: float | None = None  # set_compute: multiplies the device's base rate
    take_mib: float | None = None  # memory_pressure
    mib: float | None = None  # memory_release (None: all)
    join: DeviceSpec | None = None  # join_device
    join_links: dict[str, LinkSpec] | None = None  # join_device: optional links to others

    @property
    def subject(self) -> str:
        if self.between:
            return f"{self.between[0]}<->{self.between[1]}"
        return self.device or ""


@dataclass(frozen=True)
class Scenario:
    name: str
    file: str  # the path it was loaded from ("<string>" when parsed from text)
    version: int
    seed: int
    model: ModelSpec
    generation: GenerationSpec
    devices: tuple[DeviceSpec, ...]
    source: str
    network: NetworkSpec
    controller: ControllerSpec
    events: tuple[Event, ...] = ()
    description: str = ""
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # the parsed YAML

    def device(self, name: str) -> DeviceSpec:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def device_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)
