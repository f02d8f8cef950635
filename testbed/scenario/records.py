"""What a scenario resolves to: frozen records (devices, links, generation, controller,
emulation, events, the scenario itself) and the checks that the run fits.

Owns `Scenario` and its parts, `to_dict()` (the resolved scenario as plain data that
`scenario.parse` reads back) and `with_overrides()` (the runner's
`--seed/--tokens/--algorithm`), and what every scenario holds to whichever way it was made:
the prompt and the generated tokens fit the model's context, the model fits the devices
(`check_fits`) and the host (`check_host`). Pure: imports the format's table and reader
(scenario/format.py), the model's sizes and costs, the algorithm names and background.py's
records; no asyncio, no torch, no IO. The records are importable from
`testbed.scenario` too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..common.units import MIB, mbps_to_bytes
from ..model import cost
from ..model.spec import PRESETS, ModelSpec
from ..placement import ALGORITHM_NAMES
from . import background as bg
from .format import ACTIONS, MAX_SEED, MODEL_FIELDS, FormatReader


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    compute_gflops: float
    memory_mib: float
    memory_high_mib: float  # resolved: default 90 % of memory_mib
    host_blocks: bool = True
    memory_bandwidth_gbps: float | None = None  # GB/s (10^9 bytes/s); None: the FLOP model
    preset: str | None = None  # the device preset its values came from (scenario/presets.py)

    @property
    def flops(self) -> float:
        return self.compute_gflops * 1e9

    @property
    def bandwidth(self) -> float:
        """Memory bandwidth in bytes/s; inf without one (a job takes FLOPs / rate)."""
        return math.inf if self.memory_bandwidth_gbps is None else self.memory_bandwidth_gbps * 1e9

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_mib * MIB)

    @property
    def memory_high_bytes(self) -> int:
        return int(self.memory_high_mib * MIB)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "compute_gflops": self.compute_gflops,
            "memory_mib": self.memory_mib,
            "memory_high_mib": self.memory_high_mib,
            "host_blocks": self.host_blocks,
            # only when given, so that a scenario without them resolves as before
            **({"memory_bandwidth_gbps": self.memory_bandwidth_gbps} if self.memory_bandwidth_gbps is not None else {}),
            **({"preset": self.preset} if self.preset is not None else {}),
        }


@dataclass(frozen=True)
class LinkSpec:
    bandwidth_mbps: float
    latency_ms: float
    burst_kib: float = 0.0

    @property
    def rate_bytes(self) -> float:
        """Bytes per second."""
        return mbps_to_bytes(self.bandwidth_mbps)

    @property
    def latency_s(self) -> float:
        return self.latency_ms / 1e3

    @property
    def burst_bytes(self) -> float:
        return self.burst_kib * 1024

    def to_dict(self) -> dict:
        return {
            "bandwidth_mbps": self.bandwidth_mbps,
            "latency_ms": self.latency_ms,
            "burst_kib": self.burst_kib,
        }


DEFAULT_LINK = LinkSpec(bandwidth_mbps=100.0, latency_ms=2.0, burst_kib=0.0)


@dataclass(frozen=True)
class NetworkSpec:
    default: LinkSpec
    # symmetric overrides, keyed by the sorted device pair
    links: dict[tuple[str, str], LinkSpec] = field(default_factory=dict)

    def link(self, a: str, b: str) -> LinkSpec:
        return self.links.get((a, b) if a <= b else (b, a), self.default)

    def to_dict(self) -> dict:
        return {
            "default": self.default.to_dict(),
            "links": [{"between": list(k), **v.to_dict()} for k, v in self.links.items()],
        }


@dataclass(frozen=True)
class GenerationSpec:
    new_tokens: int
    prompt_tokens: int = 0  # length of a seeded random prompt
    prompt: str | None = None  # text, for models that carry a tokenizer

    @property
    def prompt_len_estimate(self) -> int:
        """Prompt length in tokens; for a text prompt a conservative bound (one token per
        UTF-8 byte), used for checks made before a tokenizer is loaded."""
        if self.prompt is not None:
            return max(1, len(self.prompt.encode("utf-8")))
        return self.prompt_tokens

    def to_dict(self) -> dict:
        if self.prompt is not None:
            return {"new_tokens": self.new_tokens, "prompt": self.prompt}
        return {"new_tokens": self.new_tokens, "prompt_tokens": self.prompt_tokens}


@dataclass(frozen=True)
class ControllerSpec:
    algorithm: str = "resource_aware"
    interval_tokens: int = 4
    telemetry: str = "measured"  # measured | oracle
    # the planner sees each device's mean compute and least free memory over this many
    # tokens (testbed/placement/window.py); 1: the latest observation
    window_tokens: int = 1
    # how a block moves: stop_and_copy (generation waits for weights and cache) or pre_copy
    # (they cross in stages while the source keeps serving; testbed/agents/precopy.py)
    migration: str = "stop_and_copy"

    def to_dict(self) -> dict:
        out = {
            "algorithm": self.algorithm,
            "interval_tokens": self.interval_tokens,
            "telemetry": self.telemetry,
            "window_tokens": self.window_tokens,
        }
        if self.migration != "stop_and_copy":  # absent: stop_and_copy, as in every run before the key
            out["migration"] = self.migration
        return out


@dataclass(frozen=True)
class EmulationSpec:
    """How the real clock runs: `time_scale` None picks one by calibration (`auto`)."""

    time_scale: float | None = None

    def to_dict(self) -> dict:
        return {"time_scale": "auto" if self.time_scale is None else self.time_scale}


# ---- what an event changes: one record per action (`ACTION` is its name in the file)


@dataclass(frozen=True)
class SetLink:
    """Both directions of the link between two devices get new values (None: unchanged);
    a rate of 0 takes the link down."""

    ACTION = "set_link"
    between: tuple[str, str]
    bandwidth_mbps: float | None = None
    latency_ms: float | None = None
    burst_kib: float | None = None

    @property
    def subject(self) -> str:
        return f"{self.between[0]}<->{self.between[1]}"

    def fields(self) -> dict[str, float | None]:
        """What one direction of the link is set to (the wire form of the change)."""
        return {"bandwidth_mbps": self.bandwidth_mbps, "latency_ms": self.latency_ms, "burst_kib": self.burst_kib}


@dataclass(frozen=True)
class SetCompute:
    """The device's compute rate becomes `factor` times its base rate."""

    ACTION = "set_compute"
    device: str
    factor: float


@dataclass(frozen=True)
class MemoryPressure:
    """A co-tenant takes `take_mib` of the device's memory (as much as is free)."""

    ACTION = "memory_pressure"
    device: str
    take_mib: float


@dataclass(frozen=True)
class MemoryRelease:
    """The co-tenant gives back `mib` (None: all it holds)."""

    ACTION = "memory_release"
    device: str
    mib: float | None = None


@dataclass(frozen=True)
class FailDevice:
    """The device stops abruptly: its blocks and caches are gone."""

    ACTION = "fail_device"
    device: str


@dataclass(frozen=True)
class JoinDevice:
    """A new device joins, with optional links of its own to devices already there."""

    ACTION = "join_device"
    spec: DeviceSpec
    links: dict[str, LinkSpec] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return self.spec.name


# what a device applies to itself (in process, or told by its runner over the control channel)
DeviceChange = SetCompute | MemoryPressure | MemoryRelease
Change = SetLink | DeviceChange | FailDevice | JoinDevice


def device_change(device: str, action: str, fields: dict) -> DeviceChange:
    """A device's change from its wire form (`wire_fields`): the action and its values."""
    if action == SetCompute.ACTION:
        return SetCompute(device, float(fields["factor"]))
    if action == MemoryPressure.ACTION:
        return MemoryPressure(device, float(fields["take_mib"]))
    if action == MemoryRelease.ACTION:
        return MemoryRelease(device, None if fields.get("mib") is None else float(fields["mib"]))
    raise ValueError(f"not a device action: {action!r}")


def wire_fields(c: DeviceChange) -> dict[str, float | None]:
    """A device's change as its runner sends it: every value a device action may take."""
    return {"factor": getattr(c, "factor", None), "take_mib": getattr(c, "take_mib", None),
            "mib": getattr(c, "mib", None)}


@dataclass(frozen=True)
class Event:
    """One scenario event: what it changes (`change`, a record per action) and when it
    fires: exactly one of `at_token` (before that token) and `at_s` (emulated seconds
    after generation starts). `index` is the event's position in the file (for messages
    and for a stable order among events with the same trigger)."""

    index: int
    change: Change
    at_token: int | None = None
    at_s: float | None = None

    @property
    def action(self) -> str:
        return self.change.ACTION

    @property
    def subject(self) -> str:
        c = self.change
        return c.subject if isinstance(c, SetLink) else c.device

    def to_dict(self) -> dict:
        out: dict = {"at_token": self.at_token} if self.at_token is not None else {"at_s": self.at_s}
        out["action"] = self.action
        c = self.change
        if isinstance(c, JoinDevice):
            out["device"] = c.spec.to_dict()
            out["links"] = [{"to": k, **v.to_dict()} for k, v in c.links.items()]
            return out
        for key in ACTIONS[self.action]:
            value = getattr(c, key)
            if value is not None:
                out[key] = list(value) if key == "between" else value
        return out


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
    emulation: EmulationSpec = EmulationSpec()
    background: bg.BackgroundLoad | None = None  # co-tenant load per token (testbed/scenario/background.py)
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # the parsed YAML

    def device(self, name: str) -> DeviceSpec:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def device_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)

    def joins(self) -> dict[str, JoinDevice]:
        """The devices that join during the run, by name."""
        return {e.change.device: e.change for e in self.events if isinstance(e.change, JoinDevice)}

    @property
    def final_length(self) -> int:
        """Sequence length after the last generated token (text prompts: an upper bound)."""
        return _final_length(self.model, self.generation)

    def to_dict(self) -> dict:
        """The resolved scenario as plain data (defaults filled in, the model as explicit
        sizes plus its preset name) that `parse` reads back. Events that never fire (at a
        token past a run shortened by `with_overrides(new_tokens=...)`) are left out."""
        model = {f: getattr(self.model, f) for f in MODEL_FIELDS
                 if f != "ffn_shards" or self.model.sharded}  # unsharded: as before the key existed
        if self.model.weights == "gguf":
            model = {"gguf": self.model.gguf, **model}
        elif self.model.name in PRESETS:
            model = {"preset": self.model.name, **model}
        return {
            "version": self.version,
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "model": model,
            "generation": self.generation.to_dict(),
            "devices": [d.to_dict() for d in self.devices],
            "source": self.source,
            "network": self.network.to_dict(),
            "controller": self.controller.to_dict(),
            "emulation": self.emulation.to_dict(),
            "events": [e.to_dict() for e in self.events
                       if e.at_token is None or e.at_token < self.generation.new_tokens],
            **({"background_load": self.background.to_dict()} if self.background else {}),
        }

    def with_overrides(
        self, *, seed: int | None = None, new_tokens: int | None = None, algorithm: str | None = None
    ) -> Scenario:
        """The runner's command-line overrides; None leaves a field alone. Events past a
        shortened run are kept and simply never fire."""
        r = FormatReader(self.file)
        out = self
        if seed is not None:
            out = replace(out, seed=r.int_(seed, "--seed", ge=0, le=MAX_SEED))
        if new_tokens is not None:
            gen = replace(out.generation, new_tokens=r.int_(new_tokens, "--tokens", ge=1))
            check_context(r, out.model, gen, "--tokens")
            check_fits(r, out.model, gen, out.devices, out.source, "--tokens")
            out = replace(out, generation=gen)
        if algorithm is not None:
            algo = r.choice(algorithm, "--algorithm", ALGORITHM_NAMES, "algorithm")
            out = replace(out, controller=replace(out.controller, algorithm=algo))
        return out


# ---------------------------------------------------------------------------------------------
# what every scenario holds to (parsed or overridden): the run fits the context and the memory


def check_context(r: FormatReader, model: ModelSpec, gen: GenerationSpec, path: str) -> None:
    """The prompt and the generated tokens must fit the model's context."""
    if gen.prompt is None:
        total = gen.prompt_tokens + gen.new_tokens
        if total > model.context:
            r.fail(path, f"prompt_tokens + new_tokens = {total} exceeds the context of "
                   f"{model.name} ({model.context} tokens)")
    elif gen.new_tokens >= model.context:
        r.fail(path, f"new_tokens = {gen.new_tokens} leaves no room for the prompt in the "
               f"context of {model.name} ({model.context} tokens)")


def model_bytes(model: ModelSpec, gen: GenerationSpec) -> int:
    """The whole model at the final length: every block's weights and K/V cache, and the
    source's embedding, LM head and final norm (what `memory_share` is a share of)."""
    n = _final_length(model, gen)
    return cost.model_weight_bytes(model) + cost.model_cache_bytes(model, n) + cost.source_weight_bytes(model)


def check_host(scen: Scenario, available_bytes: int, path: str = "model") -> None:
    """Refuse a model that this host cannot hold (ScenarioError): the run needs at least its
    weights and caches at the final length (the reference's copy, which the in-process
    devices share) in memory. `available_bytes` is the host's available memory, read by the
    caller (this module does no IO beyond reading scenario files)."""
    need = model_bytes(scen.model, scen.generation)
    if need > available_bytes:
        FormatReader(scen.file).fail(path, f"{scen.model.name} needs {_mib(need)} of weights and caches at "
                                     f"{scen.final_length} tokens, but this host has {_mib(available_bytes)} "
                                     "of memory available")


def _final_length(model: ModelSpec, gen: GenerationSpec) -> int:
    return min(gen.prompt_len_estimate + gen.new_tokens, model.context)


def check_fits(r: FormatReader, model: ModelSpec, gen: GenerationSpec,
               devices: tuple[DeviceSpec, ...], source: str, path: str) -> None:
    """The model must fit at the final sequence length: the source's pinned share on the
    source, the largest block on some host device, all blocks and caches on all of them."""
    n = _final_length(model, gen)
    pinned = cost.source_weight_bytes(model)
    room: dict[str, int] = {}
    for i, d in enumerate(devices):
        free = d.memory_bytes - (pinned if d.name == source else 0)
        if free < 0:
            r.fail(f"devices[{i}].memory_mib" if path == "model" else path,
                   f"the source device {d.name!r} has {_mib(d.memory_bytes)} but {model.name}'s "
                   f"embedding, LM head and final norm need {_mib(pinned)}")
        if d.host_blocks:
            room[d.name] = free
    sizes = {kind: cost.block_bytes(model, kind, n) for kind in ("head", "proj", "ffn")}
    kind = max(sizes, key=lambda k: sizes[k])
    best = max(room, key=lambda k: room[k])
    if sizes[kind] > room[best]:
        r.fail(path, f"{model.name}'s largest block ({kind}, {_mib(sizes[kind])} at {n} tokens) "
               f"fits on no host device (the most room is {_mib(room[best])} on {best!r})")
    need = cost.model_weight_bytes(model) + cost.model_cache_bytes(model, n)
    have = sum(room.values())
    if need > have:
        r.fail(path, f"{model.name} needs {_mib(need)} of blocks and caches at {n} tokens "
               f"but the host devices hold {_mib(have)}")


def _mib(nbytes: float) -> str:
    return f"{nbytes / MIB:.1f} MiB"
