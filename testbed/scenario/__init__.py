"""Scenario files (YAML, version 1): the entry points that read one into frozen records,
strictly validated; the module to import for anything of the format.

Owns `load(path)`, `loads(text)` and `parse(mapping, file)`: the file's bounds (size,
nesting), the YAML, the top level (version, name, seed, source), the sections in order and
the check that the whole fits. Each takes `model_gguf`, the runner's `--model-gguf`, which
replaces the model section. A problem raises `ScenarioError`, whose message names the file
and the key path (`devices[1].memory_mib: must be > 0`); the runner prints it on one line
and exits with status 2. Validation stops at the first problem.

The format lives in the package's other modules: `format` (`KEYS`, `CHOICES`, the limits
`MAX_*`; the reference is docs/scenarios.md), `records` (`Scenario` and its parts,
`to_dict()`, written to meta.json, `with_overrides()` for `--seed/--tokens/--algorithm`,
`check_host`), `sections` (one reader per section, `parse_time_scale`), `reader`
(`ScenarioError`, the strict YAML loader and value checks) and `background` (the optional
`background_load` section, read with the same reader). Every public name of the format is
importable from here (`__all__`); the library's own modules import records and limits from
where they live. What events do at run time is not owned here. Pure core: imports
`placement` and `model` below it (testbed.LAYERS) and yaml; reads the scenario file (and,
for `model: {gguf: PATH}`, that file's metadata); no asyncio, no torch.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ..common.files import FileRefused, read_limited, utf8
from ..common.units import MIB
from . import background as bg
from .format import (
    CHOICES,
    FACTOR_RANGE,
    GFLOPS_RANGE,
    KEYS,
    MAX_AT_S,
    MAX_BURST_KIB,
    MAX_DESCRIPTION,
    MAX_DEVICES,
    MAX_EVENTS,
    MAX_FILE_BYTES,
    MAX_INTERVAL,
    MAX_LATENCY_MS,
    MAX_MEMORY_MIB,
    MAX_MEMORY_SHARE,
    MAX_NAME,
    MAX_NESTING,
    MAX_PROMPT,
    MAX_SEED,
    MAX_TIME_SCALE,
    MBPS_RANGE,
    MODEL_MAX,
    SCENARIO_NAME,
    TOP_REQUIRED,
    FormatReader,
)
from .reader import ScenarioError, StrictLoader, check_nesting, type_name, yaml_problem
from .records import (
    DEFAULT_LINK,
    Change,
    ControllerSpec,
    DeviceChange,
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
    Scenario,
    SetCompute,
    SetLink,
    check_fits,
    check_host,
    model_bytes,
)
from .sections import (
    parse_time_scale,
    read_controller,
    read_devices,
    read_emulation,
    read_events,
    read_generation,
    read_gguf_model,
    read_model,
    read_network,
)

# the public names this module defined before the format was split into modules
__all__ = [
    "CHOICES", "DEFAULT_LINK", "FACTOR_RANGE", "GFLOPS_RANGE", "KEYS", "MAX_AT_S", "MAX_BURST_KIB",
    "MAX_DESCRIPTION", "MAX_DEVICES", "MAX_EVENTS", "MAX_FILE_BYTES", "MAX_INTERVAL", "MAX_LATENCY_MS",
    "MAX_MEMORY_MIB", "MAX_MEMORY_SHARE", "MAX_NAME", "MAX_NESTING", "MAX_PROMPT", "MAX_SEED",
    "MAX_TIME_SCALE", "MBPS_RANGE", "MIB", "MODEL_MAX", "ControllerSpec", "DeviceSpec", "EmulationSpec",
    "Event", "GenerationSpec", "LinkSpec", "NetworkSpec", "Scenario", "ScenarioError", "check_host",
    "Change", "DeviceChange", "SetLink", "SetCompute", "MemoryPressure", "MemoryRelease", "FailDevice", "JoinDevice",
    "load", "loads", "parse", "parse_time_scale",
]


def load(path: str | os.PathLike, model_gguf: str | None = None) -> Scenario:
    """Read and validate a scenario file; every problem is a ScenarioError. `model_gguf`
    (a path) replaces the file's model section with that GGUF model."""
    file = os.fspath(path)
    try:
        text = utf8(read_limited(file, MAX_FILE_BYTES, "a scenario file"))
    except FileRefused as e:
        raise ScenarioError(file, "", str(e)) from None
    return loads(text, file, model_gguf)


def loads(text: str, file: str = "<string>", model_gguf: str | None = None) -> Scenario:
    if len(text) > MAX_FILE_BYTES:
        raise ScenarioError(file, "", f"larger than {MAX_FILE_BYTES // 1024} KiB: not a scenario file")
    try:
        check_nesting(text, MAX_NESTING)
        data = yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ScenarioError(file, "", f"not valid YAML: {yaml_problem(e)}") from None
    return parse(data, file, model_gguf)


def parse(data: object, file: str = "<data>", model_gguf: str | None = None) -> Scenario:
    """Validate an already-loaded mapping (the YAML document) and resolve defaults.
    A relative `model.gguf` path is relative to the scenario file's directory (to the
    working directory for `model_gguf` and for text that comes from no file)."""
    r = FormatReader(file)
    if not isinstance(data, dict):
        r.fail("", f"the top level must be a mapping, got {type_name(data)}")
    if "version" not in data:
        r.fail("version", "is required (this testbed reads version 1)")
    version = r.int_(data["version"], "version")
    if version != 1:
        r.fail("version", f"unsupported version {version} (this testbed reads version 1)")
    top = r.section(data, "", "", TOP_REQUIRED)
    name = r.string(top["name"], "name", pattern=SCENARIO_NAME, max_len=MAX_NAME)
    description = r.string(top.get("description", ""), "description", max_len=MAX_DESCRIPTION)
    seed = r.int_(top.get("seed", 0), "seed", ge=0, le=MAX_SEED)
    if model_gguf is not None:
        model = read_gguf_model(r, {"gguf": model_gguf}, "--model-gguf", Path.cwd())
    else:
        model = read_model(r, top["model"])
    gen = read_generation(r, top["generation"], model)
    whole = model_bytes(model, gen)
    devices = read_devices(r, top["devices"], whole)
    names = [d.name for d in devices]
    source = r.string(top.get("source", names[0]), "source")
    if source not in names:
        r.fail("source", f"unknown device {source!r} (devices: {', '.join(names)})")
    network = read_network(r, top.get("network", {}), names)
    controller = read_controller(r, top.get("controller", {}))
    emulation = read_emulation(r, top.get("emulation", {}))
    events = read_events(r, top.get("events", []), names, source, gen, network.default, whole)
    background = bg.parse(r, top["background_load"], names) if "background_load" in top else None
    check_fits(r, model, gen, devices, source, "model")
    return Scenario(
        name=name, file=file, version=version, seed=seed, model=model, generation=gen,
        devices=devices, source=source, network=network, controller=controller,
        events=events, description=description, emulation=emulation, background=background, raw=data,
    )
