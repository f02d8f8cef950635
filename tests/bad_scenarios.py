"""Malformed scenarios: (id, YAML text, expected substring of the error's key path).

Every text is a complete scenario file on its own (no includes, no other files), so the
runner tests can write one to disk and expect exit status 2. `VALID` is the well-formed
scenario the broken ones are variations of.
"""

from __future__ import annotations

_HEAD = "version: 1\nname: bad\n"
_MODEL = "model: {preset: gpt-tiny}\n"
_GEN = "generation: {prompt_tokens: 8, new_tokens: 16}\n"
_DEVICES = """\
devices:
  - {name: gw, compute_gflops: 8, memory_mib: 64}
  - {name: laptop, compute_gflops: 20, memory_mib: 128}
  - {name: phone, compute_gflops: 3, memory_mib: 32}
"""


def _doc(*, head: str = _HEAD, model: str = _MODEL, gen: str = _GEN, devices: str = _DEVICES,
         rest: str = "") -> str:
    return head + model + gen + devices + rest


def _events(*lines: str) -> str:
    return "events:\n" + "".join(f"  - {line}\n" for line in lines)


VALID = _doc()

BAD_SCENARIOS: list[tuple[str, str, str]] = [
    # structure and keys
    ("unknown_top_level_key", _doc(rest="foo: 1\n"), "foo"),
    ("unknown_device_key", _doc(devices="""\
devices:
  - {name: gw, compute_gflops: 8, memory_mib: 64}
  - {name: laptop, compute_gflops: 20, memory_mib: 128, cpu: 3}
"""), "devices[1].cpu"),
    ("unknown_generation_key", _doc(gen="generation: {prompt_tokens: 8, new_tokens: 16, tokens: 4}\n"),
     "generation.tokens"),
    ("unknown_event_key", _doc(rest=_events("{at_token: 2, action: set_compute, device: laptop, factor: 0.5, take_mib: 3}")),
     "events[0].take_mib"),
    ("missing_generation", _doc(gen=""), "generation"),
    ("missing_name", _doc(head="version: 1\n"), "name"),
    ("missing_version", _doc(head="name: bad\n"), "version"),
    ("version_2", _doc(head="version: 2\nname: bad\n"), "version"),
    ("version_as_string", _doc(head="version: '1'\nname: bad\n"), "version"),
    ("bad_name_pattern", _doc(head="version: 1\nname: Bad Name\n"), "name"),
    ("events_not_a_list", _doc(rest="events: {at_token: 1}\n"), "events"),
    # types
    ("string_for_number", _doc(devices="""\
devices:
  - {name: gw, compute_gflops: 8, memory_mib: lots}
"""), "devices[0].memory_mib"),
    ("bool_for_int", _doc(gen="generation: {prompt_tokens: 8, new_tokens: true}\n"), "generation.new_tokens"),
    ("bool_for_number", _doc(devices="""\
devices:
  - {name: gw, compute_gflops: true, memory_mib: 64}
"""), "devices[0].compute_gflops"),
    ("float_for_int", _doc(rest="seed: 1.5\n"), "seed"),
    ("string_for_bool", _doc(devices="""\
devices:
  - {name: gw, compute_gflops: 8, memory_mib: 64, host_blocks: "true"}
"""), "devices[0].host_blocks"),
    ("exponent_read_as_text", _doc(rest="network:\n  default: {bandwidth_mbps: 1e3, latency_ms: 2}\n"),
     "network.default.bandwidth_mbps"),
    ("nan_compute", _doc(devices="""\
devices:
  - {name: gw, compute_gflops: .nan, memory_mib: 64}
"""), "devices[0].compute_gflops"),
    ("negative_seed", _doc(rest="seed: -1\n"), "seed"),
    # sizes
    ("negative_bandwidth", _doc(rest="network:\n  default: {bandwidth_mbps: -5, latency_ms: 2}\n"),
     "network.default.bandwidth_mbps"),
    ("zero_link_bandwidth", _doc(rest="""\
network:
  links:
    - {between: [gw, laptop], bandwidth_mbps: 0}
"""), "network.links[0].bandwidth_mbps"),
    ("negative_latency", _doc(rest="network:\n  default: {bandwidth_mbps: 100, latency_ms: -1}\n"),
     "network.default.latency_ms"),
    ("zero_memory", _doc(devices="""\
devices:
  - {name: gw, compute_gflops: 8, memory_mib: 64}
  - {name: laptop, compute_gflops: 20, memory_mib: 128}
  - {name: phone, compute_gflops: 3, memory_mib: 0}
"""), "devices[2].memory_mib"),
    ("high_above_max", _doc(devices="""\
devices:
  - {name: gw, compute_gflops: 8, memory_mib: 64, memory_high_mib: 80}
"""), "devices[0].memory_high_mib"),
    ("zero_interval", _doc(rest="controller: {interval_tokens: 0}\n"), "controller.interval_tokens"),
    # devices
    ("empty_devices", _doc(devices="devices: []\n"), "devices"),
    ("duplicate_device_names", _doc(devices="""\
devices:
  - {name: gw, compute_gflops: 8, memory_mib: 64}
  - {name: gw, compute_gflops: 20, memory_mib: 128}
"""), "devices[1].name"),
    ("bad_device_name", _doc(devices="""\
devices:
  - {name: "my phone", compute_gflops: 8, memory_mib: 64}
"""), "devices[0].name"),
    ("no_host_device", _doc(devices="""\
devices:
  - {name: gw, compute_gflops: 8, memory_mib: 64, host_blocks: false}
"""), "devices"),
    ("unknown_source", _doc(rest="source: fridge\n"), "source"),
    # network
    ("unknown_device_in_link", _doc(rest="""\
network:
  links:
    - {between: [gw, fridge], bandwidth_mbps: 10}
"""), "network.links[0].between[1]"),
    ("duplicate_link_pair", _doc(rest="""\
network:
  links:
    - {between: [gw, laptop], bandwidth_mbps: 10}
    - {between: [laptop, gw], bandwidth_mbps: 20}
"""), "network.links[1].between"),
    ("link_to_itself", _doc(rest="""\
network:
  links:
    - {between: [gw, gw], bandwidth_mbps: 10}
"""), "network.links[0].between"),
    ("link_with_three_ends", _doc(rest="""\
network:
  links:
    - {between: [gw, laptop, phone], bandwidth_mbps: 10}
"""), "network.links[0].between"),
    # controller
    ("unknown_algorithm", _doc(rest="controller: {algorithm: magic}\n"), "controller.algorithm"),
    ("unknown_telemetry", _doc(rest="controller: {telemetry: psychic}\n"), "controller.telemetry"),
    ("unknown_migration", _doc(rest="controller: {migration: live}\n"), "controller.migration"),
    # model
    ("unknown_preset", _doc(model="model: {preset: gpt-5}\n"), "model.preset"),
    ("d_model_not_multiple_of_heads", _doc(model="model: {preset: gpt-tiny, d_model: 66}\n"),
     "model.d_model"),
    ("custom_model_missing_heads", _doc(model="model: {layers: 2, d_model: 64, vocab: 256}\n"),
     "model.heads"),
    ("unknown_dtype", _doc(model="model: {preset: gpt-tiny, dtype: float8}\n"), "model.dtype"),
    ("real_weights_resized", _doc(model="model: {preset: smollm2-135m, layers: 2}\n", devices="""\
devices:
  - {name: gw, compute_gflops: 8, memory_mib: 2048}
"""), "model.layers"),
    ("model_fits_nowhere", _doc(model="model: {preset: gpt2-small}\n", devices="""\
devices:
  - {name: gw, compute_gflops: 8, memory_mib: 256}
  - {name: laptop, compute_gflops: 20, memory_mib: 64}
  - {name: phone, compute_gflops: 3, memory_mib: 32}
"""), "model"),
    ("largest_block_fits_nowhere", _doc(
        model="model: {layers: 1, heads: 2, d_model: 1024, vocab: 16}\n", devices="""\
devices:
  - {name: gw, compute_gflops: 8, memory_mib: 20}
  - {name: a, compute_gflops: 8, memory_mib: 20}
  - {name: b, compute_gflops: 8, memory_mib: 20}
  - {name: c, compute_gflops: 8, memory_mib: 20}
"""), "model"),
    ("source_too_small", _doc(model="model: {preset: gpt-mini}\n", devices="""\
devices:
  - {name: gw, compute_gflops: 8, memory_mib: 2}
  - {name: laptop, compute_gflops: 20, memory_mib: 128}
"""), "devices[0].memory_mib"),
    # generation
    ("text_prompt_random_weights", _doc(gen="generation: {prompt: hello, new_tokens: 16}\n"),
     "generation.prompt"),
    ("prompt_and_prompt_tokens", _doc(
        gen="generation: {prompt_tokens: 8, prompt: hello, new_tokens: 16}\n"), "generation"),
    ("no_prompt", _doc(gen="generation: {new_tokens: 16}\n"), "generation"),
    ("zero_new_tokens", _doc(gen="generation: {prompt_tokens: 8, new_tokens: 0}\n"),
     "generation.new_tokens"),
    ("longer_than_context", _doc(gen="generation: {prompt_tokens: 2000, new_tokens: 100}\n"),
     "generation.new_tokens"),
    # events
    ("unknown_device_in_event", _doc(rest=_events("{at_token: 2, action: set_compute, device: fridge, factor: 0.5}")),
     "events[0].device"),
    ("unknown_device_in_set_link", _doc(rest=_events("{at_token: 2, action: set_link, between: [fridge, gw], bandwidth_mbps: 1}")),
     "events[0].between[0]"),
    ("both_triggers", _doc(rest=_events("{at_token: 2, at_s: 0.5, action: fail_device, device: phone}")),
     "events[0]"),
    ("no_trigger", _doc(rest=_events("{action: fail_device, device: phone}")), "events[0]"),
    ("at_token_beyond_run", _doc(rest=_events("{at_token: 16, action: fail_device, device: phone}")),
     "events[0].at_token"),
    ("negative_at_s", _doc(rest=_events("{at_s: -1, action: fail_device, device: phone}")),
     "events[0].at_s"),
    ("unknown_action", _doc(rest=_events("{at_token: 2, action: explode, device: phone}")),
     "events[0].action"),
    ("missing_action", _doc(rest=_events("{at_token: 2, device: phone}")), "events[0].action"),
    ("fail_source", _doc(rest=_events("{at_token: 2, action: fail_device, device: gw}")),
     "events[0].device"),
    ("set_link_changes_nothing", _doc(rest=_events("{at_token: 2, action: set_link, between: [gw, phone]}")),
     "events[0]"),
    ("set_link_negative_rate", _doc(rest=_events("{at_token: 2, action: set_link, between: [gw, phone], bandwidth_mbps: -1}")),
     "events[0].bandwidth_mbps"),
    ("zero_compute_factor", _doc(rest=_events("{at_token: 2, action: set_compute, device: phone, factor: 0}")),
     "events[0].factor"),
    ("pressure_without_amount", _doc(rest=_events("{at_token: 2, action: memory_pressure, device: phone}")),
     "events[0].take_mib"),
    ("release_zero", _doc(rest=_events("{at_token: 2, action: memory_release, device: phone, mib: 0}")),
     "events[0].mib"),
    ("join_existing_name", _doc(rest=_events(
        "{at_token: 2, action: join_device, device: {name: phone, compute_gflops: 5, memory_mib: 64}}")),
     "events[0].device.name"),
    ("join_link_to_unknown", _doc(rest=_events(
        "{at_token: 2, action: join_device, device: {name: tab, compute_gflops: 5, memory_mib: 64},"
        " links: [{to: fridge, bandwidth_mbps: 10}]}")), "events[0].links[0].to"),
    ("event_before_join_in_list", _doc(rest=_events(
        "{at_token: 4, action: set_compute, device: tab, factor: 0.5}",
        "{at_token: 2, action: join_device, device: {name: tab, compute_gflops: 5, memory_mib: 64}}")),
     "events[0].device"),
    ("event_due_before_join", _doc(rest=_events(
        "{at_token: 8, action: join_device, device: {name: tab, compute_gflops: 5, memory_mib: 64}}",
        "{at_token: 4, action: fail_device, device: tab}")), "events[1].device"),
    # background load (testbed/scenario/background.py) and the planner's window
    ("window_tokens_zero", _doc(rest="controller: {window_tokens: 0}\n"), "controller.window_tokens"),
    ("background_not_a_mapping", _doc(rest="background_load: [gw]\n"), "background_load"),
    ("background_unknown_key", _doc(rest="background_load: {tokens: 4}\n"), "background_load.tokens"),
    ("background_negative_before", _doc(rest="background_load: {before_tokens: -1}\n"),
     "background_load.before_tokens"),
    ("background_unknown_device", _doc(rest="background_load: {devices: [{device: tablet, memory: 0.1}]}\n"),
     "background_load.devices[0].device"),
    ("background_device_twice", _doc(rest="background_load: {devices: [{device: gw}, {device: gw, memory: 0.1}]}\n"),
     "background_load.devices[1].device"),
    ("background_entry_without_device", _doc(rest="background_load: {devices: [{memory: 0.1}]}\n"),
     "background_load.devices[0].device"),
    ("background_unknown_resource", _doc(rest="background_load: {devices: [{device: gw, disk: 0.1}]}\n"),
     "background_load.devices[0].disk"),
    ("background_whole_device", _doc(rest="background_load: {devices: [{device: gw, memory: 1.0}]}\n"),
     "background_load.devices[0].memory"),
    ("background_share_as_text", _doc(rest="background_load: {default: {compute: lots}}\n"),
     "background_load.default.compute"),
    ("background_negative_in_series", _doc(rest="background_load: {devices: [{device: phone, compute: [0.1, -0.2]}]}\n"),
     "background_load.devices[0].compute[1]"),
    ("background_empty_series", _doc(rest="background_load: {devices: [{device: phone, compute: []}]}\n"),
     "background_load.devices[0].compute"),
    ("background_uniform_reversed", _doc(rest="background_load: {default: {memory: {uniform: [0.3, 0.1]}}}\n"),
     "background_load.default.memory.uniform"),
    ("background_uniform_one_bound", _doc(rest="background_load: {default: {memory: {uniform: [0.3]}}}\n"),
     "background_load.default.memory.uniform"),
    ("background_uniform_to_one", _doc(rest="background_load: {default: {memory: {uniform: [0.1, 1]}}}\n"),
     "background_load.default.memory.uniform[1]"),
    ("background_unknown_distribution", _doc(rest="background_load: {default: {memory: {normal: [0.1, 0.2]}}}\n"),
     "background_load.default.memory.normal"),
]

# absurd numbers and sizes: each is refused in one line before anything
# is written (the last field: a substring of that line). `model_too_large_for_host` (about
# 900 GiB of weights) is refused by the runner, against this host's memory, not by the loader
_HUGE_MODEL = "model: {layers: 2, heads: 8, d_model: 65536, vocab: 2097152}\n"
_HUGE_DEVICES = "devices:\n" + "".join(
    f"  - {{name: d{i}, compute_gflops: 8, memory_mib: 1048576}}\n" for i in range(4))
LIMIT_SCENARIOS: list[tuple[str, str, str]] = [
    ("nested_20000_deep", _doc(rest="extra: " + "[" * 20000 + "]" * 20000 + "\n"), "nest"),
    ("name_300_characters", _doc(head="version: 1\nname: " + "n" * 300 + "\n"), "name: is 300 characters long"),
    ("memory_1e300", _doc(devices="""\
devices:
  - {name: gw, compute_gflops: 8, memory_mib: 1.0e+300}
"""), "devices[0].memory_mib: must be <="),
    ("interval_1e30", _doc(rest="controller: {interval_tokens: " + str(10**30) + "}\n"),
     "controller.interval_tokens: must be <="),
    ("compute_1e-12", _doc(devices="""\
devices:
  - {name: gw, compute_gflops: 8, memory_mib: 64}
  - {name: laptop, compute_gflops: 20, memory_mib: 128}
  - {name: phone, compute_gflops: 1.0e-12, memory_mib: 32}
"""), "devices[2].compute_gflops: must be >="),
    ("model_too_large_for_host", _doc(model=_HUGE_MODEL, devices=_HUGE_DEVICES), "memory available"),
    ("description_50_mb", _doc(rest="description: " + "d" * (50 << 20) + "\n"), "larger than"),
    ("description_20000_characters", _doc(rest="description: " + "d" * 20000 + "\n"), "description: is 20000 characters long"),
    ("factor_1e9", _doc(rest=_events("{at_token: 2, action: set_compute, device: phone, factor: 1.0e+9}")),
     "events[0].factor: must be <="),
    ("bandwidth_1e12", _doc(rest="network:\n  default: {bandwidth_mbps: 1.0e+12, latency_ms: 2}\n"),
     "network.default.bandwidth_mbps: must be <="),
    ("latency_one_day", _doc(rest="network:\n  default: {bandwidth_mbps: 100, latency_ms: 86400000}\n"),
     "network.default.latency_ms: must be <="),
    ("at_s_1e300", _doc(rest=_events("{at_s: 1.0e+300, action: fail_device, device: phone}")),
     "events[0].at_s: must be <="),
    ("seed_2_to_the_70", _doc(rest=f"seed: {2 ** 70}\n"), "seed: must be <="),
    ("vocab_2_to_the_40", _doc(model=f"model: {{preset: gpt-tiny, vocab: {2 ** 40}}}\n"), "model.vocab: must be <="),
]
