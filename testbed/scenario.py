"""Scenario files (YAML, version 1): parsing into frozen dataclasses, strict validation.

Owns the scenario format (`KEYS`: every key it accepts, per section; the reference is
docs/scenarios.md); raises `ScenarioError`, whose message names the file and the key path
(`devices[1].memory_mib: must be > 0`). The strict reading (the YAML loader, the per-value
checks with key paths, `ScenarioError` itself) is in scenario_reader.py, and `ScenarioError`
is importable from here as before. Pure: reads the scenario file (and, for
`model: {gguf: PATH}`, that file's metadata), no asyncio, no torch. The runner prints a
ScenarioError on one line and exits with status 2.

Entry points: `load(path)`, `loads(text)`, `parse(mapping, file)`; each takes `model_gguf`,
the runner's `--model-gguf`, which replaces the model section. `Scenario.to_dict()` gives
the resolved scenario back as plain data (`parse(s.to_dict(), f) == s`, written to meta.json)
and `Scenario.with_overrides()` applies the runner's `--seed/--tokens/--algorithm`.
Validation stops at the first problem. What events do at run time is not owned here; the
optional `background_load` section is read by background.py with this module's reader.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from . import background as bg
from .model import cost
from .model.spec import PRESETS, ModelSpec
from .placement import ALGORITHM_NAMES
from .scenario_reader import Reader, ScenarioError, check_nesting
from .scenario_reader import StrictLoader as _StrictLoader
from .scenario_reader import type_name as _type_name
from .scenario_reader import yaml_problem as _yaml_problem

MIB = 1024 * 1024
MAX_TIME_SCALE = 10_000.0  # emulation.time_scale: at most this many wall seconds per emulated one

# Sane ranges (README, "Scenario limits"). Beyond them a number is a typo or an attack: it
# overflows the wire format (memory counters are 64-bit), stalls the clock (a device so
# slow that one job outlasts float resolution), or exhausts this host before the run can
# record anything. The file itself is bounded before YAML sees it.
MAX_FILE_BYTES = 256 * 1024  # a scenario file
MAX_NESTING = 32  # levels of YAML mappings and lists
MAX_NAME = 64  # characters of a scenario or device name (the scenario's is a directory name)
MAX_DESCRIPTION = 10_000  # characters
MAX_PROMPT = 65_536  # characters of a text prompt
MAX_SEED = (1 << 63) - 1
MAX_DEVICES = 256  # declared plus joining
MAX_EVENTS = 10_000
GFLOPS_RANGE = (1e-3, 1e6)  # compute_gflops: 1 MFLOP/s .. 1 PFLOP/s
MAX_MEMORY_MIB = float(1 << 20)  # 1 TiB: memory_mib, memory_high_mib, take_mib, mib
MAX_MEMORY_SHARE = 1000.0  # memory_share (a multiple of the whole model)
MBPS_RANGE = (1e-3, 1e6)  # bandwidth_mbps: 1 kbit/s .. 1 Tbit/s (set_link may also give 0)
MAX_LATENCY_MS = 60_000.0
MAX_BURST_KIB = float(1 << 20)  # 1 GiB
MAX_INTERVAL = 1_000_000  # controller.interval_tokens
MAX_AT_S = 1e6  # events' at_s (about 11.6 days of emulated time)
FACTOR_RANGE = (1e-3, 1e3)  # set_compute's factor
MODEL_MAX = {"layers": 1024, "heads": 1024, "kv_heads": 1024, "d_model": 65_536, "d_ff": 1 << 18,
             "vocab": 1 << 21, "context": 1 << 20}


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

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "compute_gflops": self.compute_gflops,
            "memory_mib": self.memory_mib,
            "memory_high_mib": self.memory_high_mib,
            "host_blocks": self.host_blocks,
        }


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

    def to_dict(self) -> dict:
        return {
            "algorithm": self.algorithm,
            "interval_tokens": self.interval_tokens,
            "telemetry": self.telemetry,
            "window_tokens": self.window_tokens,
        }


@dataclass(frozen=True)
class EmulationSpec:
    """How the real clock runs: `time_scale` None picks one by calibration (`auto`)."""

    time_scale: float | None = None

    def to_dict(self) -> dict:
        return {"time_scale": "auto" if self.time_scale is None else self.time_scale}


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

    def to_dict(self) -> dict:
        out: dict = {"at_token": self.at_token} if self.at_token is not None else {"at_s": self.at_s}
        out["action"] = self.action
        if self.action == "join_device":
            assert self.join is not None
            out["device"] = self.join.to_dict()
            out["links"] = [{"to": k, **v.to_dict()} for k, v in (self.join_links or {}).items()]
            return out
        for key in _ACTIONS[self.action]:
            value = getattr(self, key)
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
    background: bg.BackgroundLoad | None = None  # co-tenant load per token (testbed/background.py)
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # the parsed YAML

    def device(self, name: str) -> DeviceSpec:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def device_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)

    @property
    def final_length(self) -> int:
        """Sequence length after the last generated token (text prompts: an upper bound)."""
        return _final_length(self.model, self.generation)

    def to_dict(self) -> dict:
        """The resolved scenario as plain data (defaults filled in, the model as explicit
        sizes plus its preset name) that `parse` reads back. Events that never fire (at a
        token past a run shortened by `with_overrides(new_tokens=...)`) are left out."""
        model = {f: getattr(self.model, f) for f in _MODEL_FIELDS}
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
        r = _Reader(self.file)
        out = self
        if seed is not None:
            out = replace(out, seed=r.int_(seed, "--seed", ge=0, le=MAX_SEED))
        if new_tokens is not None:
            gen = replace(out.generation, new_tokens=r.int_(new_tokens, "--tokens", ge=1))
            _check_context(r, out.model, gen, "--tokens")
            _check_fits(r, out.model, gen, out.devices, out.source, "--tokens")
            out = replace(out, generation=gen)
        if algorithm is not None:
            algo = r.choice(algorithm, "--algorithm", ALGORITHM_NAMES, "algorithm")
            out = replace(out, controller=replace(out.controller, algorithm=algo))
        return out


# ---------------------------------------------------------------------------------------------
# the format

_MODEL_FIELDS = ("layers", "heads", "d_model", "d_ff", "vocab", "dtype", "kv_heads", "context")
_LINK_KEYS = ("bandwidth_mbps", "latency_ms", "burst_kib")

# Every key the format accepts, per section: the one table behind the loader's unknown-key
# check (`_Reader.section`), and what tests/test_scenario_reference.py holds the scenario
# reference (docs/scenarios.md) to, so a key added here must be documented there.
# `[]` marks the items of a list. An event takes the keys of `events[]` plus those of its
# action (`events[].ACTION`); join_device's `device` is a device as in `devices[]`.
KEYS: dict[str, tuple[str, ...]] = {
    "": ("version", "name", "description", "seed", "model", "generation", "devices", "source",
         "network", "controller", "emulation", "events", "background_load"),
    "model": ("preset", "gguf", *_MODEL_FIELDS),
    "generation": ("new_tokens", "prompt_tokens", "prompt"),
    "devices[]": ("name", "compute_gflops", "memory_mib", "memory_share", "memory_high_mib", "host_blocks"),
    "network": ("default", "links"),
    "network.default": _LINK_KEYS,
    "network.links[]": ("between", *_LINK_KEYS),
    "controller": ("algorithm", "interval_tokens", "telemetry", "window_tokens"),
    "emulation": ("time_scale",),
    "events[]": ("at_token", "at_s", "action"),
    "events[].set_link": ("between", *_LINK_KEYS),
    "events[].set_compute": ("device", "factor"),
    "events[].memory_pressure": ("device", "take_mib"),
    "events[].memory_release": ("device", "mib"),
    "events[].fail_device": ("device",),
    "events[].join_device": ("device", "links"),
    "events[].join_device.links[]": ("to", *_LINK_KEYS),
    **bg.KEYS,  # background_load and its parts
}
_TOP_REQUIRED = ("version", "name", "model", "generation", "devices")
# action -> the keys it takes besides the trigger and `action`
_ACTIONS: dict[str, tuple[str, ...]] = {
    k.removeprefix("events[]."): v for k, v in KEYS.items() if k.startswith("events[].") and k.count(".") == 1}
# the values of the keys that name one of a few things (the reference lists them too)
CHOICES: dict[str, tuple[str, ...]] = {
    "model.preset": tuple(PRESETS),
    "controller.algorithm": ALGORITHM_NAMES,
    "controller.telemetry": ("measured", "oracle"),
    "events[].action": tuple(_ACTIONS),
}
_ACTION_REQUIRED: dict[str, tuple[str, ...]] = {
    "set_link": ("between",),
    "set_compute": ("device", "factor"),
    "memory_pressure": ("device", "take_mib"),
    "memory_release": ("device",),
    "fail_device": ("device",),
    "join_device": ("device",),
}


class _Reader(Reader):
    """The strict reader with this format's table of keys (what `section` checks against)."""

    keys = KEYS


_SCENARIO_NAME = re.compile(r"[a-z0-9_-]+")
_DEVICE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def load(path: str | os.PathLike, model_gguf: str | None = None) -> Scenario:
    """Read and validate a scenario file; every problem is a ScenarioError. `model_gguf`
    (a path) replaces the file's model section with that GGUF model."""
    file = os.fspath(path)
    try:
        with open(file, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise ScenarioError(file, "", f"larger than {MAX_FILE_BYTES // 1024} KiB: not a scenario file")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ScenarioError(file, "", "no such file") from None
    except IsADirectoryError:
        raise ScenarioError(file, "", "is a directory, not a scenario file") from None
    except UnicodeDecodeError as e:
        raise ScenarioError(file, "", f"not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ScenarioError(file, "", f"cannot read: {e.strerror or e}") from None
    return loads(text, file, model_gguf)


def loads(text: str, file: str = "<string>", model_gguf: str | None = None) -> Scenario:
    if len(text) > MAX_FILE_BYTES:
        raise ScenarioError(file, "", f"larger than {MAX_FILE_BYTES // 1024} KiB: not a scenario file")
    try:
        check_nesting(text, MAX_NESTING)
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ScenarioError(file, "", f"not valid YAML: {_yaml_problem(e)}") from None
    return parse(data, file, model_gguf)


def parse(data: object, file: str = "<data>", model_gguf: str | None = None) -> Scenario:
    """Validate an already-loaded mapping (the YAML document) and resolve defaults.
    A relative `model.gguf` path is relative to the scenario file's directory (to the
    working directory for `model_gguf` and for text that comes from no file)."""
    r = _Reader(file)
    if not isinstance(data, dict):
        r.fail("", f"the top level must be a mapping, got {_type_name(data)}")
    if "version" not in data:
        r.fail("version", "is required (this testbed reads version 1)")
    version = r.int_(data["version"], "version")
    if version != 1:
        r.fail("version", f"unsupported version {version} (this testbed reads version 1)")
    top = r.section(data, "", "", _TOP_REQUIRED)
    name = r.string(top["name"], "name", pattern=_SCENARIO_NAME, max_len=MAX_NAME)
    description = r.string(top.get("description", ""), "description", max_len=MAX_DESCRIPTION)
    seed = r.int_(top.get("seed", 0), "seed", ge=0, le=MAX_SEED)
    if model_gguf is not None:
        model = _gguf_model(r, {"gguf": model_gguf}, "--model-gguf", Path.cwd())
    else:
        model = _model(r, top["model"])
    gen = _generation(r, top["generation"], model)
    whole = _model_bytes(model, gen)
    devices = _devices(r, top["devices"], whole)
    names = [d.name for d in devices]
    source = r.string(top.get("source", names[0]), "source")
    if source not in names:
        r.fail("source", f"unknown device {source!r} (devices: {', '.join(names)})")
    network = _network(r, top.get("network", {}), names)
    controller = _controller(r, top.get("controller", {}))
    emulation = _emulation(r, top.get("emulation", {}))
    events = _events(r, top.get("events", []), names, source, gen, network.default, whole)
    background = bg.parse(r, top["background_load"], names) if "background_load" in top else None
    _check_fits(r, model, gen, devices, source, "model")
    return Scenario(
        name=name, file=file, version=version, seed=seed, model=model, generation=gen,
        devices=devices, source=source, network=network, controller=controller,
        events=events, description=description, emulation=emulation, background=background, raw=data,
    )


# ---------------------------------------------------------------------------------------------
# sections


def _model_fields(r: _Reader, m: dict, where: str) -> dict[str, object]:
    fields: dict[str, object] = {}
    for f in _MODEL_FIELDS:
        if f in m:
            p = f"{where}.{f}"
            fields[f] = r.string(m[f], p) if f == "dtype" else r.int_(m[f], p, le=MODEL_MAX[f])
    return fields


def _model(r: _Reader, value: object) -> ModelSpec:
    m = r.section(value, "model", "model")
    if "gguf" in m:
        if "preset" in m:
            r.fail("model", "give exactly one of preset or gguf, not both")
        base = Path(r.file).parent if os.path.isfile(r.file) else Path.cwd()
        return _gguf_model(r, m, "model", base)
    fields = _model_fields(r, m, "model")
    if "preset" in m:
        preset = r.choice(m["preset"], "model.preset", CHOICES["model.preset"], "preset")
        base = PRESETS[preset]
        if base.weights != "random":
            for f, v in fields.items():
                if getattr(base, f) != v:
                    r.fail(f"model.{f}", f"preset {preset} has real weights ({base.weights}); "
                           f"its {f} is {getattr(base, f)} and cannot be overridden")
        # sizes that the preset derives (d_ff = 4*d_model, MHA kv_heads = heads) follow the
        # overridden size unless they are given too
        if "d_model" in fields and "d_ff" not in fields and base.d_ff == 4 * base.d_model:
            fields["d_ff"] = 0
        if "heads" in fields and "kv_heads" not in fields and base.kv_heads == base.heads:
            fields["kv_heads"] = 0
        spec = replace(base, **fields)
    else:
        for f in ("layers", "heads", "d_model", "vocab"):
            if f not in fields:
                r.fail(f"model.{f}", f"is required without a preset (presets: {', '.join(PRESETS)})")
        spec = ModelSpec(name="custom", **fields)  # type: ignore[arg-type]
    for f, msg in spec.problems():
        r.fail(f"model.{f}", msg)
    return spec


def _gguf_model(r: _Reader, m: dict, where: str, base: Path) -> ModelSpec:
    """A model read from a GGUF file: its metadata gives the spec; the scenario may choose
    the dtype and a shorter context, and may restate (not change) the sizes."""
    from .model.gguf_file import GGUFError, ReaderMissing, spec_from_gguf

    key = "model.gguf" if where == "model" else where
    raw = r.string(m["gguf"], key)
    if not raw:
        r.fail(key, "must name a GGUF file")
    path = Path(raw).expanduser()
    path = (path if path.is_absolute() else base / path).resolve()
    try:
        spec = spec_from_gguf(path)
    except GGUFError as e:
        r.fail(key, str(e))
    except ReaderMissing as e:
        r.fail(key, str(e))
    fields = _model_fields(r, m, where)
    for f, v in fields.items():
        if f in ("dtype", "context"):
            continue
        if getattr(spec, f) != v:
            r.fail(f"{where}.{f}", f"{path.name} gives {f} = {getattr(spec, f)}; a GGUF model's sizes "
                   "come from its file and cannot be overridden")
    if "context" in fields and not 0 < fields["context"] <= spec.context:  # type: ignore[operator]
        r.fail(f"{where}.context", f"must be in 1..{spec.context} (the context of {path.name})")
    spec = replace(spec, **{f: fields[f] for f in ("dtype", "context") if f in fields})
    for f, msg in spec.problems():
        r.fail(f"{where}.{f}", msg)
    return spec


def _generation(r: _Reader, value: object, model: ModelSpec) -> GenerationSpec:
    g = r.section(value, "generation", "generation", ("new_tokens",))
    new_tokens = r.int_(g["new_tokens"], "generation.new_tokens", ge=1, le=MODEL_MAX["context"])
    if "prompt_tokens" in g and "prompt" in g:
        r.fail("generation", "give exactly one of prompt_tokens or prompt, not both")
    if "prompt" in g:
        prompt = r.string(g["prompt"], "generation.prompt", max_len=MAX_PROMPT)
        if not prompt:
            r.fail("generation.prompt", "must not be empty")
        if model.weights == "random":
            r.fail("generation.prompt",
                   "text prompts need a model with a tokenizer, e.g. preset smollm2-135m")
        gen = GenerationSpec(new_tokens=new_tokens, prompt=prompt)
    elif "prompt_tokens" in g:
        prompt_tokens = r.int_(g["prompt_tokens"], "generation.prompt_tokens", ge=1, le=MODEL_MAX["context"])
        gen = GenerationSpec(new_tokens=new_tokens, prompt_tokens=prompt_tokens)
    else:
        r.fail("generation", "needs prompt_tokens (a seeded random prompt) or prompt (text)")
    _check_context(r, model, gen, "generation.new_tokens")
    return gen


def _check_context(r: _Reader, model: ModelSpec, gen: GenerationSpec, path: str) -> None:
    if gen.prompt is None:
        total = gen.prompt_tokens + gen.new_tokens
        if total > model.context:
            r.fail(path, f"prompt_tokens + new_tokens = {total} exceeds the context of "
                   f"{model.name} ({model.context} tokens)")
    elif gen.new_tokens >= model.context:
        r.fail(path, f"new_tokens = {gen.new_tokens} leaves no room for the prompt in the "
               f"context of {model.name} ({model.context} tokens)")


def _model_bytes(model: ModelSpec, gen: GenerationSpec) -> int:
    """The whole model at the final length: every block's weights and K/V cache, and the
    source's embedding, LM head and final norm (what `memory_share` is a share of)."""
    n = _final_length(model, gen)
    return cost.model_weight_bytes(model) + cost.model_cache_bytes(model, n) + cost.source_weight_bytes(model)


def _device(r: _Reader, value: object, path: str, whole: int) -> DeviceSpec:
    d = r.section(value, path, "devices[]", ("name", "compute_gflops"))
    name = r.string(d["name"], f"{path}.name", pattern=_DEVICE_NAME, max_len=MAX_NAME)
    gflops = r.number(d["compute_gflops"], f"{path}.compute_gflops", ge=GFLOPS_RANGE[0], le=GFLOPS_RANGE[1])
    if ("memory_mib" in d) == ("memory_share" in d):
        r.fail(path, "give exactly one of memory_mib or memory_share (a share of the whole model)")
    if "memory_mib" in d:
        memory = r.number(d["memory_mib"], f"{path}.memory_mib", gt=0, le=MAX_MEMORY_MIB)
    else:
        share = r.number(d["memory_share"], f"{path}.memory_share", gt=0, le=MAX_MEMORY_SHARE)
        memory = round(share * whole / MIB, 3)
        if memory > MAX_MEMORY_MIB:
            r.fail(f"{path}.memory_share", f"gives {memory:g} MiB, more than {MAX_MEMORY_MIB:g}")
        if memory <= 0:
            r.fail(f"{path}.memory_share", "gives no memory at all")
    if "memory_high_mib" in d:
        high = r.number(d["memory_high_mib"], f"{path}.memory_high_mib", gt=0, le=MAX_MEMORY_MIB)
        if high > memory:
            r.fail(f"{path}.memory_high_mib", f"must be <= memory_mib ({memory:g}), got {high:g}")
    else:
        high = 0.9 * memory
    host = r.boolean(d.get("host_blocks", True), f"{path}.host_blocks")
    return DeviceSpec(name=name, compute_gflops=gflops, memory_mib=memory,
                      memory_high_mib=high, host_blocks=host)


def _devices(r: _Reader, value: object, whole: int) -> tuple[DeviceSpec, ...]:
    items = r.list_(value, "devices")
    if not items:
        r.fail("devices", "must list at least one device")
    if len(items) > MAX_DEVICES:
        r.fail("devices", f"lists {len(items)} devices, more than {MAX_DEVICES}")
    devices: list[DeviceSpec] = []
    for i, item in enumerate(items):
        d = _device(r, item, f"devices[{i}]", whole)
        for j, other in enumerate(devices):
            if other.name == d.name:
                r.fail(f"devices[{i}].name", f"duplicate device name {d.name!r} (also devices[{j}])")
        devices.append(d)
    if not any(d.host_blocks for d in devices):
        r.fail("devices", "no device may host model blocks: at least one needs host_blocks: true")
    return tuple(devices)


def _link(r: _Reader, m: dict, path: str, base: LinkSpec) -> LinkSpec:
    """Link values from an already-checked mapping; missing ones come from `base`."""
    def get(key: str, fallback: float) -> float:
        return _link_value(r, m[key], f"{path}.{key}", key, down=False) if key in m else fallback
    return LinkSpec(
        bandwidth_mbps=get("bandwidth_mbps", base.bandwidth_mbps),
        latency_ms=get("latency_ms", base.latency_ms),
        burst_kib=get("burst_kib", base.burst_kib),
    )


def _link_value(r: _Reader, value: object, path: str, key: str, down: bool) -> float:
    """One of a link's numbers within its range; `down`: a bandwidth of 0 (set_link takes
    the link down) is allowed too."""
    if key == "bandwidth_mbps":
        if down and value == 0 and not isinstance(value, bool):
            return 0.0
        return r.number(value, path, ge=MBPS_RANGE[0], le=MBPS_RANGE[1])
    return r.number(value, path, ge=0, le=MAX_LATENCY_MS if key == "latency_ms" else MAX_BURST_KIB)


def _network(r: _Reader, value: object, names: list[str]) -> NetworkSpec:
    net = r.section(value, "network", "network")
    default = DEFAULT_LINK
    if "default" in net:
        default = _link(r, r.section(net["default"], "network.default", "network.default"),
                        "network.default", DEFAULT_LINK)
    links: dict[tuple[str, str], LinkSpec] = {}
    where: dict[tuple[str, str], int] = {}
    for i, item in enumerate(r.list_(net.get("links", []), "network.links")):
        p = f"network.links[{i}]"
        m = r.section(item, p, "network.links[]", ("between",))
        a, b = _pair(r, m["between"], f"{p}.between", names)
        key = (a, b) if a <= b else (b, a)
        if key in links:
            r.fail(f"{p}.between", f"link {a}<->{b} is already set by network.links[{where[key]}]")
        links[key], where[key] = _link(r, m, p, default), i
    return NetworkSpec(default=default, links=links)


def _pair(r: _Reader, value: object, path: str, known: Iterable[str]) -> tuple[str, str]:
    items = r.list_(value, path)
    if len(items) != 2:
        r.fail(path, f"must name two devices, got {len(items)}")
    a, b = (_known_device(r, v, f"{path}[{k}]", known) for k, v in enumerate(items))
    if a == b:
        r.fail(path, f"a link joins two different devices, got {a!r} twice")
    return a, b


def _known_device(r: _Reader, value: object, path: str, known: Iterable[str]) -> str:
    name = r.string(value, path)
    known = list(known)
    if name not in known:
        r.fail(path, f"unknown device {name!r} (known: {', '.join(known)})")
    return name


def _controller(r: _Reader, value: object) -> ControllerSpec:
    c = r.section(value, "controller", "controller")
    d = ControllerSpec()
    return ControllerSpec(
        algorithm=r.choice(c.get("algorithm", d.algorithm), "controller.algorithm",
                           CHOICES["controller.algorithm"], "algorithm"),
        interval_tokens=r.int_(c.get("interval_tokens", d.interval_tokens),
                               "controller.interval_tokens", ge=1, le=MAX_INTERVAL),
        telemetry=r.choice(c.get("telemetry", d.telemetry), "controller.telemetry",
                           CHOICES["controller.telemetry"], "telemetry"),
        window_tokens=r.int_(c.get("window_tokens", d.window_tokens), "controller.window_tokens", ge=1,
                             le=MAX_INTERVAL),
    )


def _emulation(r: _Reader, value: object) -> EmulationSpec:
    e = r.section(value, "emulation", "emulation")
    return EmulationSpec(time_scale=parse_time_scale(e.get("time_scale", "auto"), r.file, "emulation.time_scale"))


def parse_time_scale(value: object, file: str, path: str) -> float | None:
    """`auto` (None: calibrate on this host) or a number K from 1 to MAX_TIME_SCALE: emulated
    time runs K times slower than the wall clock. ScenarioError naming `file` and `path`."""
    r = _Reader(file)
    if value == "auto":
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            r.fail(path, f"must be auto or a number from 1 to {MAX_TIME_SCALE:g}, got {value!r}")
    k = r.number(value, path, ge=1.0)
    if k > MAX_TIME_SCALE:
        r.fail(path, f"must be at most {MAX_TIME_SCALE:g}, got {k:g}")
    return k


def _events(r: _Reader, value: object, names: list[str], source: str, gen: GenerationSpec,
            default_link: LinkSpec, whole: int) -> tuple[Event, ...]:
    known = list(names)  # declared devices, then devices joined by earlier events
    joined: dict[str, tuple[str, float, int]] = {}  # name -> (trigger kind, value, event index)
    events: list[Event] = []
    items = r.list_(value, "events")
    if len(items) > MAX_EVENTS:
        r.fail("events", f"lists {len(items)} events, more than {MAX_EVENTS}")
    for i, item in enumerate(items):
        p = f"events[{i}]"
        e = r.mapping(item, p)
        if "action" not in e:
            r.fail(f"{p}.action", f"is required (one of {', '.join(_ACTIONS)})")
        action = r.choice(e["action"], f"{p}.action", CHOICES["events[].action"], "action")
        r.section(e, p, ("events[]", f"events[].{action}"), _ACTION_REQUIRED[action])
        if "at_token" in e and "at_s" in e:
            r.fail(p, "give exactly one of at_token or at_s, not both")
        if "at_token" in e:
            at_token = r.int_(e["at_token"], f"{p}.at_token", ge=0)
            if at_token >= gen.new_tokens:
                r.fail(f"{p}.at_token",
                       f"never fires: the run generates {gen.new_tokens} tokens (0..{gen.new_tokens - 1})")
            trigger: tuple[str, float] = ("at_token", at_token)
        elif "at_s" in e:
            trigger = ("at_s", r.number(e["at_s"], f"{p}.at_s", ge=0, le=MAX_AT_S))
        else:
            r.fail(p, "needs a trigger: at_token (before token N) or at_s (emulated seconds)")

        kw: dict = {"at_token" if trigger[0] == "at_token" else "at_s": trigger[1]}
        if action == "set_link":
            kw["between"] = _pair(r, e["between"], f"{p}.between", known)
            for k, name in enumerate(kw["between"]):
                _check_joined_before(r, name, f"{p}.between[{k}]", trigger, joined)
            for key in _LINK_KEYS:
                if key in e:
                    kw[key] = _link_value(r, e[key], f"{p}.{key}", key, down=True)
            if not any(key in e for key in _LINK_KEYS):
                r.fail(p, "set_link needs at least one of bandwidth_mbps, latency_ms, burst_kib")
        elif action == "join_device":
            kw["join"] = new = _device(r, e["device"], f"{p}.device", whole)
            if new.name in known:
                r.fail(f"{p}.device.name", f"device {new.name!r} already exists")
            if len(known) >= MAX_DEVICES:
                r.fail(f"{p}.device", f"would be device {len(known) + 1}, more than {MAX_DEVICES}")
            kw["device"] = new.name
            kw["join_links"] = links = {}
            for j, item_link in enumerate(r.list_(e.get("links", []), f"{p}.links")):
                lp = f"{p}.links[{j}]"
                m = r.section(item_link, lp, "events[].join_device.links[]", ("to",))
                to = _event_device(r, m["to"], f"{lp}.to", known, trigger, joined)
                if to in links:
                    r.fail(f"{lp}.to", f"a link to {to!r} is already given")
                links[to] = _link(r, m, lp, default_link)
            known.append(new.name)
            joined[new.name] = (*trigger, i)
        else:
            kw["device"] = name = _event_device(r, e["device"], f"{p}.device", known, trigger, joined)
            if action == "fail_device" and name == source:
                r.fail(f"{p}.device", "the source device runs the controller and cannot fail")
            if action == "set_compute":
                kw["factor"] = r.number(e["factor"], f"{p}.factor", ge=FACTOR_RANGE[0], le=FACTOR_RANGE[1])
            elif action == "memory_pressure":
                kw["take_mib"] = r.number(e["take_mib"], f"{p}.take_mib", gt=0, le=MAX_MEMORY_MIB)
            elif action == "memory_release" and "mib" in e:
                kw["mib"] = r.number(e["mib"], f"{p}.mib", gt=0, le=MAX_MEMORY_MIB)
        events.append(Event(index=i, action=action, **kw))
    return tuple(events)


def _event_device(r: _Reader, value: object, path: str, known: list[str],
                  trigger: tuple[str, float], joined: dict[str, tuple[str, float, int]]) -> str:
    name = _known_device(r, value, path, known)
    _check_joined_before(r, name, path, trigger, joined)
    return name


def _check_joined_before(r: _Reader, name: str, path: str, trigger: tuple[str, float],
                         joined: dict[str, tuple[str, float, int]]) -> None:
    """An event on a joining device must not be due before the join (when comparable)."""
    if name in joined:
        kind, at, index = joined[name]
        if kind == trigger[0] and trigger[1] < at:
            unit = f"token {at}" if kind == "at_token" else f"{at:g} s"
            r.fail(path, f"device {name!r} only joins at {unit} (events[{index}])")


def check_host(scen: Scenario, available_bytes: int, path: str = "model") -> None:
    """Refuse a model that this host cannot hold (ScenarioError): the run needs at least its
    weights and caches at the final length (the reference's copy, which the in-process
    devices share) in memory. `available_bytes` is the host's available memory, read by the
    caller (this module does no IO beyond reading scenario files)."""
    need = _model_bytes(scen.model, scen.generation)
    if need > available_bytes:
        _Reader(scen.file).fail(path, f"{scen.model.name} needs {_mib(need)} of weights and caches at "
                                f"{scen.final_length} tokens, but this host has {_mib(available_bytes)} "
                                "of memory available")


def _final_length(model: ModelSpec, gen: GenerationSpec) -> int:
    return min(gen.prompt_len_estimate + gen.new_tokens, model.context)


def _check_fits(r: _Reader, model: ModelSpec, gen: GenerationSpec,
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
