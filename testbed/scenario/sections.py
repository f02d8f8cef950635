"""Reading a scenario's sections: one reader per section of the format, each checking its
values against their key paths and building the records.

Owns how each section is read and what is refused within it (the model, from a preset, sizes
or a GGUF file; generation; devices; network; controller; emulation, with
`parse_time_scale`, which the runner also uses for `--time-scale`; events, in file order,
with joining devices); `scenario.parse` calls them in order and checks the whole. Pure:
imports the format (scenario/format.py) and the records (scenario/records.py); reads no file
but a GGUF model's metadata (model/gguf_file.py, imported when a scenario names one); no
asyncio, no torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..common.units import DEFAULT_HIGH_SHARE, MIB
from ..model.spec import PRESETS, ModelSpec
from . import presets
from .format import (
    ACTION_REQUIRED,
    ACTIONS,
    CHOICES,
    DEVICE_NAME,
    FACTOR_RANGE,
    GBPS_RANGE,
    GFLOPS_RANGE,
    LINK_KEYS,
    MAX_AT_S,
    MAX_BURST_KIB,
    MAX_DEVICES,
    MAX_EVENTS,
    MAX_INTERVAL,
    MAX_LATENCY_MS,
    MAX_MEMORY_MIB,
    MAX_MEMORY_SHARE,
    MAX_NAME,
    MAX_PROMPT,
    MAX_TIME_SCALE,
    MBPS_RANGE,
    MODEL_FIELDS,
    MODEL_MAX,
    FormatReader,
)
from .records import (
    DEFAULT_LINK,
    Change,
    ControllerSpec,
    DeviceSpec,
    EmulationSpec,
    Event,
    FailDevice,
    GenerationSpec,
    JoinDevice,
    LinkSpec,
    MemoryPressure,
    MemoryRelease,
    NetworkSpec,
    SetCompute,
    SetLink,
    check_context,
)


def _model_fields(r: FormatReader, m: dict, where: str) -> dict[str, Any]:
    fields: dict[str, object] = {}
    for f in MODEL_FIELDS:
        if f in m:
            p = f"{where}.{f}"
            fields[f] = r.string(m[f], p) if f == "dtype" else r.int_(m[f], p, le=MODEL_MAX[f])
    return fields


def read_model(r: FormatReader, value: object) -> ModelSpec:
    """`model`: a preset (random weights may be resized), explicit sizes, or a GGUF file."""
    m = r.section(value, "model", "model")
    if "gguf" in m:
        if "preset" in m:
            r.fail("model", "give exactly one of preset or gguf, not both")
        base = Path(r.file).parent if os.path.isfile(r.file) else Path.cwd()
        return read_gguf_model(r, m, "model", base)
    fields = _model_fields(r, m, "model")
    if "preset" in m:
        preset = r.choice(m["preset"], "model.preset", CHOICES["model.preset"], "preset")
        named = PRESETS[preset]
        if named.weights != "random":
            for f, v in fields.items():
                if f != "ffn_shards" and getattr(named, f) != v:  # sharding changes no size
                    r.fail(f"model.{f}", f"preset {preset} has real weights ({named.weights}); "
                           f"its {f} is {getattr(named, f)} and cannot be overridden")
        # sizes that the preset derives (d_ff = 4*d_model, MHA kv_heads = heads) follow the
        # overridden size unless they are given too
        if "d_model" in fields and "d_ff" not in fields and named.d_ff == 4 * named.d_model:
            fields["d_ff"] = 0
        if "heads" in fields and "kv_heads" not in fields and named.kv_heads == named.heads:
            fields["kv_heads"] = 0
        spec = replace(named, **fields)
    else:
        for f in ("layers", "heads", "d_model", "vocab"):
            if f not in fields:
                r.fail(f"model.{f}", f"is required without a preset (presets: {', '.join(PRESETS)})")
        spec = ModelSpec(name="custom", **fields)
    for f, msg in spec.problems():
        r.fail(f"model.{f}", msg)
    return spec


def read_gguf_model(r: FormatReader, m: dict, where: str, base: Path) -> ModelSpec:
    """A model read from a GGUF file: its metadata gives the spec; the scenario may choose
    the dtype and a shorter context, and may restate (not change) the sizes."""
    from ..model.gguf_file import GGUFError, ReaderMissing, spec_from_gguf

    key = "model.gguf" if where == "model" else where
    raw = r.string(m["gguf"], key)
    if not raw:
        r.fail(key, "must name a GGUF file")
    path = Path(raw).expanduser()
    try:
        path = (path if path.is_absolute() else base / path).resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        r.fail(key, f"{path}: symlink loop (too many levels of symbolic links)")
    try:
        spec = spec_from_gguf(path)
    except GGUFError as e:
        r.fail(key, str(e))
    except ReaderMissing as e:
        r.fail(key, str(e))
    fields = _model_fields(r, m, where)
    for f, v in fields.items():
        if f in ("dtype", "context", "ffn_shards"):
            continue
        if getattr(spec, f) != v:
            r.fail(f"{where}.{f}", f"{path.name} gives {f} = {getattr(spec, f)}; a GGUF model's sizes "
                   "come from its file and cannot be overridden")
    if "context" in fields and not 0 < fields["context"] <= spec.context:
        r.fail(f"{where}.context", f"must be in 1..{spec.context} (the context of {path.name})")
    chosen: dict[str, Any] = {f: fields[f] for f in ("dtype", "context", "ffn_shards") if f in fields}
    spec = replace(spec, **chosen)
    for f, msg in spec.problems():
        r.fail(f"{where}.{f}", msg)
    return spec


def read_generation(r: FormatReader, value: object, model: ModelSpec) -> GenerationSpec:
    """`generation`: new tokens and a seeded random or a text prompt, within the context."""
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
    check_context(r, model, gen, "generation.new_tokens")
    return gen


def _device(r: FormatReader, value: object, path: str, whole: int) -> DeviceSpec:
    d = r.section(value, path, "devices[]", ("name",))
    name = r.string(d["name"], f"{path}.name", pattern=DEVICE_NAME, max_len=MAX_NAME)
    preset = None
    if "preset" in d:  # its values are the defaults of the keys below
        preset = presets.DEVICES[r.choice(d["preset"], f"{path}.preset", CHOICES["devices[].preset"], "device preset")]
    if "compute_gflops" in d:
        gflops = r.number(d["compute_gflops"], f"{path}.compute_gflops", ge=GFLOPS_RANGE[0], le=GFLOPS_RANGE[1])
    elif preset is not None:
        gflops = preset.compute_gflops
    else:
        r.fail(path, "needs compute_gflops (or a preset that gives it)")
    bandwidth = None
    if "memory_bandwidth_gbps" in d:
        bandwidth = r.number(d["memory_bandwidth_gbps"], f"{path}.memory_bandwidth_gbps",
                             ge=GBPS_RANGE[0], le=GBPS_RANGE[1])
    elif preset is not None:
        bandwidth = preset.memory_bandwidth_gbps
    if "memory_mib" in d and "memory_share" in d or preset is None and "memory_mib" not in d and "memory_share" not in d:
        r.fail(path, "give exactly one of memory_mib or memory_share (a share of the whole model)")
    if "memory_mib" not in d and "memory_share" not in d:
        assert preset is not None
        memory = preset.memory_mib
    elif "memory_mib" in d:
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
        high = DEFAULT_HIGH_SHARE * memory
    host = r.boolean(d.get("host_blocks", True), f"{path}.host_blocks")
    return DeviceSpec(name=name, compute_gflops=gflops, memory_mib=memory,
                      memory_high_mib=high, host_blocks=host, memory_bandwidth_gbps=bandwidth,
                      preset=None if preset is None else preset.name)


def read_devices(r: FormatReader, value: object, whole: int) -> tuple[DeviceSpec, ...]:
    """`devices`: uniquely named, at least one hosting blocks; `whole` (bytes of the whole
    model) resolves `memory_share`."""
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


def _link(r: FormatReader, m: dict, path: str, base: LinkSpec) -> LinkSpec:
    """Link values from an already-checked mapping; missing ones come from its `preset`
    (network.default, network.links[]), then from `base`."""
    if "preset" in m:
        section = "network.default" if path == "network.default" else "network.links[]"
        lp = presets.LINKS[r.choice(m["preset"], f"{path}.preset", CHOICES[f"{section}.preset"], "link preset")]
        base = replace(base, bandwidth_mbps=lp.bandwidth_mbps, latency_ms=lp.latency_ms)

    def get(key: str, fallback: float) -> float:
        return _link_value(r, m[key], f"{path}.{key}", key, down=False) if key in m else fallback
    return LinkSpec(
        bandwidth_mbps=get("bandwidth_mbps", base.bandwidth_mbps),
        latency_ms=get("latency_ms", base.latency_ms),
        burst_kib=get("burst_kib", base.burst_kib),
    )


def _link_value(r: FormatReader, value: object, path: str, key: str, down: bool) -> float:
    """One of a link's numbers within its range; `down`: a bandwidth of 0 (set_link takes
    the link down) is allowed too."""
    if key == "bandwidth_mbps":
        if down and value == 0 and not isinstance(value, bool):
            return 0.0
        return r.number(value, path, ge=MBPS_RANGE[0], le=MBPS_RANGE[1])
    return r.number(value, path, ge=0, le=MAX_LATENCY_MS if key == "latency_ms" else MAX_BURST_KIB)


def read_network(r: FormatReader, value: object, names: list[str]) -> NetworkSpec:
    """`network`: the default link and symmetric overrides between the devices `names`."""
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


def _pair(r: FormatReader, value: object, path: str, known: Iterable[str]) -> tuple[str, str]:
    items = r.list_(value, path)
    if len(items) != 2:
        r.fail(path, f"must name two devices, got {len(items)}")
    a, b = (_known_device(r, v, f"{path}[{k}]", known) for k, v in enumerate(items))
    if a == b:
        r.fail(path, f"a link joins two different devices, got {a!r} twice")
    return a, b


def _known_device(r: FormatReader, value: object, path: str, known: Iterable[str]) -> str:
    name = r.string(value, path)
    known = list(known)
    if name not in known:
        r.fail(path, f"unknown device {name!r} (known: {', '.join(known)})")
    return name


def read_controller(r: FormatReader, value: object) -> ControllerSpec:
    """`controller`: what is left out takes `ControllerSpec`'s defaults."""
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
        migration=r.choice(c.get("migration", d.migration), "controller.migration",
                           CHOICES["controller.migration"], "migration"),
    )


def read_emulation(r: FormatReader, value: object) -> EmulationSpec:
    """`emulation`: the time scale (`auto` unless given)."""
    e = r.section(value, "emulation", "emulation")
    return EmulationSpec(time_scale=parse_time_scale(e.get("time_scale", "auto"), r.file, "emulation.time_scale"))


def parse_time_scale(value: object, file: str, path: str) -> float | None:
    """`auto` (None: calibrate on this host) or a number 0 < K <= MAX_TIME_SCALE: emulated
    time runs K times slower than the wall clock (below 1: faster, where the host is faster
    than the emulated devices). ScenarioError naming `file` and `path`."""
    r = FormatReader(file)
    if value == "auto":
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            r.fail(path, f"must be auto or a number above 0 and at most {MAX_TIME_SCALE:g}, got {value!r}")
    k = r.number(value, path, gt=0.0)
    if k > MAX_TIME_SCALE:
        r.fail(path, f"must be at most {MAX_TIME_SCALE:g}, got {k:g}")
    return k


def read_events(r: FormatReader, value: object, names: list[str], source: str, gen: GenerationSpec,
                default_link: LinkSpec, whole: int) -> tuple[Event, ...]:
    """`events`, in file order: each names devices declared or joined by an earlier event,
    and fires within the run (`at_token` below `new_tokens`)."""
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
            r.fail(f"{p}.action", f"is required (one of {', '.join(ACTIONS)})")
        action = r.choice(e["action"], f"{p}.action", CHOICES["events[].action"], "action")
        r.section(e, p, ("events[]", f"events[].{action}"), ACTION_REQUIRED[action])
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

        change: Change
        if action == "set_link":
            between = _pair(r, e["between"], f"{p}.between", known)
            for k, name in enumerate(between):
                _check_joined_before(r, name, f"{p}.between[{k}]", trigger, joined)
            values = {key: _link_value(r, e[key], f"{p}.{key}", key, down=True) for key in LINK_KEYS if key in e}
            if not values:
                r.fail(p, "set_link needs at least one of bandwidth_mbps, latency_ms, burst_kib")
            change = SetLink(between, **values)
        elif action == "join_device":
            new = _device(r, e["device"], f"{p}.device", whole)
            if new.name in known:
                r.fail(f"{p}.device.name", f"device {new.name!r} already exists")
            if len(known) >= MAX_DEVICES:
                r.fail(f"{p}.device", f"would be device {len(known) + 1}, more than {MAX_DEVICES}")
            links: dict[str, LinkSpec] = {}
            change = JoinDevice(new, links)
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
            name = _event_device(r, e["device"], f"{p}.device", known, trigger, joined)
            if action == "fail_device" and name == source:
                r.fail(f"{p}.device", "the source device runs the controller and cannot fail")
            if action == "set_compute":
                change = SetCompute(name, r.number(e["factor"], f"{p}.factor", ge=FACTOR_RANGE[0], le=FACTOR_RANGE[1]))
            elif action == "memory_pressure":
                change = MemoryPressure(name, r.number(e["take_mib"], f"{p}.take_mib", gt=0, le=MAX_MEMORY_MIB))
            elif action == "memory_release":
                change = MemoryRelease(name, r.number(e["mib"], f"{p}.mib", gt=0, le=MAX_MEMORY_MIB) if "mib" in e else None)
            else:
                change = FailDevice(name)
        if trigger[0] == "at_token":
            events.append(Event(i, change, at_token=int(trigger[1])))
        else:
            events.append(Event(i, change, at_s=trigger[1]))
    return tuple(events)


def _event_device(r: FormatReader, value: object, path: str, known: list[str],
                  trigger: tuple[str, float], joined: dict[str, tuple[str, float, int]]) -> str:
    name = _known_device(r, value, path, known)
    _check_joined_before(r, name, path, trigger, joined)
    return name


def _check_joined_before(r: FormatReader, name: str, path: str, trigger: tuple[str, float],
                         joined: dict[str, tuple[str, float, int]]) -> None:
    """An event on a joining device must not be due before the join (when comparable)."""
    if name in joined:
        kind, at, index = joined[name]
        if kind == trigger[0] and trigger[1] < at:
            unit = f"token {at}" if kind == "at_token" else f"{at:g} s"
            r.fail(path, f"device {name!r} only joins at {unit} (events[{index}])")
