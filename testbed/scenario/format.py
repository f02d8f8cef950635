"""What the scenario format (version 1) accepts: every key per section, the values of the keys
that name one of a few things, and each number's sane range.

Owns `KEYS` (the one table behind the loader's unknown-key check, and what the reference,
docs/scenarios.md, is held to), `CHOICES`, the per-action tables of events, the limits
(`MAX_*`, `*_RANGE`) and `FormatReader`, the strict reader bound to `KEYS`. The
records are in scenario/records.py, the section readers in scenario/sections.py, the entry
points in scenario.py (which re-exports all of this). Pure data: imports the strict reader
(scenario/reader.py), background.py's keys, the model presets and the algorithm names; no
asyncio, no torch, no IO.
"""

from __future__ import annotations

import re

from ..model.spec import PRESETS
from ..placement import ALGORITHM_NAMES
from . import background as bg
from . import presets
from .reader import Reader

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
GBPS_RANGE = (1e-3, 1e5)  # memory_bandwidth_gbps: 1 MB/s .. 100 TB/s
MAX_MEMORY_MIB = float(1 << 20)  # 1 TiB: memory_mib, memory_high_mib, take_mib, mib
MAX_MEMORY_SHARE = 1000.0  # memory_share (a multiple of the whole model)
MBPS_RANGE = (1e-3, 1e6)  # bandwidth_mbps: 1 kbit/s .. 1 Tbit/s (set_link may also give 0)
MAX_LATENCY_MS = 60_000.0
MAX_BURST_KIB = float(1 << 20)  # 1 GiB
MAX_INTERVAL = 1_000_000  # controller.interval_tokens
MAX_AT_S = 1e6  # events' at_s (about 11.6 days of emulated time)
FACTOR_RANGE = (1e-3, 1e3)  # set_compute's factor
MODEL_MAX = {"layers": 1024, "heads": 1024, "kv_heads": 1024, "d_model": 65_536, "d_ff": 1 << 18,
             "vocab": 1 << 21, "context": 1 << 20, "ffn_shards": 1 << 18}

# ---------------------------------------------------------------------------------------------
# the table of keys

MODEL_FIELDS = ("layers", "heads", "d_model", "d_ff", "vocab", "dtype", "kv_heads", "context", "ffn_shards")
LINK_KEYS = ("bandwidth_mbps", "latency_ms", "burst_kib")

# Every key the format accepts, per section: the one table behind the loader's unknown-key
# check (`FormatReader.section`), and what tests/test_scenario_reference.py holds the scenario
# reference (docs/scenarios.md) to, so a key added here must be documented there.
# `[]` marks the items of a list. An event takes the keys of `events[]` plus those of its
# action (`events[].ACTION`); join_device's `device` is a device as in `devices[]`.
KEYS: dict[str, tuple[str, ...]] = {
    "": ("version", "name", "description", "seed", "model", "generation", "devices", "source",
         "network", "controller", "emulation", "events", "background_load"),
    "model": ("preset", "gguf", *MODEL_FIELDS),
    "generation": ("new_tokens", "prompt_tokens", "prompt"),
    "devices[]": ("name", "preset", "compute_gflops", "memory_bandwidth_gbps", "memory_mib", "memory_share",
                  "memory_high_mib", "host_blocks"),
    "network": ("default", "links"),
    "network.default": ("preset", *LINK_KEYS),
    "network.links[]": ("between", "preset", *LINK_KEYS),
    "controller": ("algorithm", "interval_tokens", "telemetry", "window_tokens", "migration"),
    "emulation": ("time_scale",),
    "events[]": ("at_token", "at_s", "action"),
    "events[].set_link": ("between", *LINK_KEYS),
    "events[].set_compute": ("device", "factor"),
    "events[].memory_pressure": ("device", "take_mib"),
    "events[].memory_release": ("device", "mib"),
    "events[].fail_device": ("device",),
    "events[].join_device": ("device", "links"),
    "events[].join_device.links[]": ("to", *LINK_KEYS),
    **bg.KEYS,  # background_load and its parts
}
TOP_REQUIRED = ("version", "name", "model", "generation", "devices")
# action -> the keys it takes besides the trigger and `action`
ACTIONS: dict[str, tuple[str, ...]] = {
    k.removeprefix("events[]."): v for k, v in KEYS.items() if k.startswith("events[].") and k.count(".") == 1}
# the values of the keys that name one of a few things (the reference lists them too)
CHOICES: dict[str, tuple[str, ...]] = {
    "model.preset": tuple(PRESETS),
    "devices[].preset": tuple(presets.DEVICES),
    "network.default.preset": tuple(presets.LINKS),
    "network.links[].preset": tuple(presets.LINKS),
    "controller.algorithm": ALGORITHM_NAMES,
    "controller.telemetry": ("measured", "oracle"),
    "controller.migration": ("stop_and_copy", "pre_copy"),
    "events[].action": tuple(ACTIONS),
}
ACTION_REQUIRED: dict[str, tuple[str, ...]] = {
    "set_link": ("between",),
    "set_compute": ("device", "factor"),
    "memory_pressure": ("device", "take_mib"),
    "memory_release": ("device",),
    "fail_device": ("device",),
    "join_device": ("device",),
}


class FormatReader(Reader):
    """The strict reader with this format's table of keys (what `section` checks against)."""

    keys = KEYS


# what a scenario's name (a directory name too) and a device's name may be made of
SCENARIO_NAME = re.compile(r"[a-z0-9_-]+")
DEVICE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
