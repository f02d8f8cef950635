"""Scenario parsing and validation (testbed/scenario/__init__.py): the malformed-file table, file-level
failures, resolved values and defaults, to_dict round trips, overrides, shipped scenarios."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from testbed import scenario as sc
from testbed.model import cost
from testbed.model.spec import PRESETS
from testbed.scenario import LinkSpec, ScenarioError

sys.path.insert(0, str(Path(__file__).parent))
from bad_scenarios import BAD_SCENARIOS, LIMIT_SCENARIOS, VALID  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "scenarios").glob("*.yaml"))

FULL = """\
version: 1
name: bandwidth_drop
description: free text
seed: 7
model:
  preset: gpt-mini
generation:
  prompt_tokens: 16
  new_tokens: 64
devices:
  - name: phone
    compute_gflops: 2.0
    memory_mib: 64
    memory_high_mib: 56
    host_blocks: true
  - {name: laptop, compute_gflops: 20, memory_mib: 512}
  - {name: hub, compute_gflops: 1, memory_mib: 16, host_blocks: false}
source: phone
network:
  default: {bandwidth_mbps: 100, latency_ms: 2}
  links:
    - {between: [phone, laptop], bandwidth_mbps: 50, latency_ms: 5}
    - {between: [hub, phone], bandwidth_mbps: 10, burst_kib: 64}
controller:
  algorithm: resource_aware
  interval_tokens: 4
  telemetry: oracle
events:
  - {at_token: 20, action: set_link, between: [phone, laptop], bandwidth_mbps: 2, latency_ms: 20}
  - {at_token: 30, action: memory_pressure, device: phone, take_mib: 40}
  - {at_token: 50, action: memory_release, device: phone}
  - {at_s: 1.5, action: set_compute, device: laptop, factor: 0.25}
  - {at_token: 40, action: fail_device, device: laptop}
  - {at_token: 60, action: join_device, device: {name: tablet, compute_gflops: 5, memory_mib: 256},
     links: [{to: phone, bandwidth_mbps: 300}]}
  - {at_token: 62, action: set_link, between: [tablet, hub], bandwidth_mbps: 0}
"""


def _error(text: str, file: str = "s.yaml") -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        sc.loads(text, file)
    return info.value


def _assert_one_line(err: ScenarioError, file: str, path: str) -> None:
    msg = str(err)
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg.startswith(f"{file}: "), msg
    assert err.file == file
    assert path in err.path, msg
    assert path in msg


# ---------------------------------------------------------------------------------------------
# malformed scenarios


@pytest.mark.parametrize(("text", "expect"), [case[1:] for case in LIMIT_SCENARIOS
                                               if case[0] != "model_too_large_for_host"],
                         ids=[case[0] for case in LIMIT_SCENARIOS if case[0] != "model_too_large_for_host"])
def test_absurd_numbers_and_sizes_are_refused_in_one_line(text, expect):
    """Nesting, file size, names, memory, compute, intervals, factors, rates, latencies,
    times, seeds and model sizes out of their documented ranges."""
    err = _error(text)
    assert "\n" not in str(err) and expect in str(err), str(err)


def test_keys_and_file_names_with_control_characters_are_refused_in_one_line():
    """A YAML key may hold newlines, tabs or any control character, and a file name too
    (found by the fuzz test below): the refusal still fits one line and names the key."""
    doc = yaml.safe_load(VALID)
    doc["model"] = {"\n\n    ": 0}
    with pytest.raises(ScenarioError) as info:
        sc.parse(doc, "two\nlines.yaml")
    text = str(info.value)
    assert "\n" not in text and text.startswith("two\\nlines.yaml: model.\\n\\n"), text
    assert "unknown key" in text
    doc["model"] = {"k" * 5000: 0}
    with pytest.raises(ScenarioError) as info:
        sc.parse(doc, "s.yaml")
    assert len(str(info.value)) < 400 and "5000 characters" in str(info.value), str(info.value)


def test_a_model_larger_than_the_host_is_refused():
    text = dict((c[0], c[1]) for c in LIMIT_SCENARIOS)["model_too_large_for_host"]
    scen = sc.loads(text, "s.yaml")
    with pytest.raises(ScenarioError) as info:
        sc.check_host(scen, 64 << 30)
    _assert_one_line(info.value, "s.yaml", "model")
    assert "available" in str(info.value)
    sc.check_host(sc.loads(VALID), 64 << 30)  # a small model fits


def test_the_clock_survives_a_device_far_slower_than_the_limits(tmp_path):
    """A device below the compute range (1e-12 GFLOP/s: one job outlasts the float
    resolution of 1 ns, and a fixed 1 ns timer resolution would spin the virtual clock at
    100 % CPU): the loader refuses it, and the clock advances regardless."""
    from testbed.experiments import run as experiment

    scen = sc.load(ROOT / "scenarios" / "steady.yaml").with_overrides(new_tokens=2)
    slow = tuple(dataclasses.replace(d, compute_gflops=1e-12) if d.name == "phone" else d for d in scen.devices)
    scen = dataclasses.replace(scen, devices=slow)
    o = experiment.run(experiment.prepare(scen), "round_robin", tmp_path / "run", clock="virtual")
    assert o.ok and o.summary["emulated_s"] > 1e9, (o.status, o.summary.get("emulated_s"))


def test_the_table_is_big_and_its_ids_unique():
    ids = [case[0] for case in BAD_SCENARIOS]
    assert len(ids) == len(set(ids)) >= 18


def test_the_base_of_the_table_is_valid():
    s = sc.loads(VALID)
    assert s.name == "bad" and s.device_names == ("gw", "laptop", "phone")


@pytest.mark.parametrize(("text", "path"), [case[1:] for case in BAD_SCENARIOS],
                         ids=[case[0] for case in BAD_SCENARIOS])
def test_bad_scenario_is_refused_naming_file_and_key(tmp_path, text, path):
    f = tmp_path / "scenario.yaml"
    f.write_text(text)
    with pytest.raises(ScenarioError) as info:
        sc.load(f)
    _assert_one_line(info.value, str(f), path)
    # the same problem from text and from the loaded mapping
    _assert_one_line(_error(text, "x.yaml"), "x.yaml", path)
    with pytest.raises(ScenarioError, match=r"^y\.yaml: "):
        sc.parse(yaml.safe_load(text), "y.yaml")


def test_missing_file(tmp_path):
    f = tmp_path / "nope.yaml"
    with pytest.raises(ScenarioError) as info:
        sc.load(f)
    _assert_one_line(info.value, str(f), "")
    assert "no such file" in str(info.value)


def test_directory(tmp_path):
    with pytest.raises(ScenarioError) as info:
        sc.load(tmp_path)
    _assert_one_line(info.value, str(tmp_path), "")
    assert "directory" in str(info.value)


def test_not_yaml_names_the_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("version: 1\nname: x\nkey: [unclosed\n")
    with pytest.raises(ScenarioError) as info:
        sc.load(str(f))
    _assert_one_line(info.value, str(f), "")
    assert "not valid YAML" in str(info.value) and "line " in str(info.value)


def test_top_level_list(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- version: 1\n- name: x\n")
    with pytest.raises(ScenarioError) as info:
        sc.load(f)
    _assert_one_line(info.value, str(f), "")
    assert "must be a mapping, got list" in str(info.value)


def test_empty_file(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("")
    with pytest.raises(ScenarioError, match="got null"):
        sc.load(f)


def test_not_utf8(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes(b"version: 1\nname: caf\xe9\n")
    with pytest.raises(ScenarioError, match="UTF-8"):
        sc.load(f)


def test_duplicate_yaml_key_names_the_line():
    err = _error("version: 1\nname: a\nseed: 1\nseed: 2\n")
    _assert_one_line(err, "s.yaml", "")
    assert "duplicate key 'seed'" in str(err) and "line 4" in str(err)


def test_yaml_merge_keys_are_not_duplicates():
    text = VALID.replace("devices:\n", "devices:\n  - &base {name: x, compute_gflops: 1, memory_mib: 8}\n")
    text += "  - {<<: *base, name: y}\n"
    assert sc.loads(text).device_names[-1] == "y"


# ---------------------------------------------------------------------------------------------
# a full valid scenario: values and defaults


def test_full_scenario_values():
    s = sc.loads(FULL, "full.yaml")
    assert (s.version, s.name, s.description, s.seed, s.file) == (1, "bandwidth_drop", "free text", 7, "full.yaml")
    assert s.model == PRESETS["gpt-mini"]
    assert (s.generation.prompt_tokens, s.generation.new_tokens, s.generation.prompt) == (16, 64, None)
    assert s.final_length == 80
    phone, laptop, hub = s.devices
    assert (phone.compute_gflops, phone.memory_mib, phone.memory_high_mib) == (2.0, 64.0, 56.0)
    assert laptop.memory_high_mib == pytest.approx(0.9 * 512) and laptop.host_blocks
    assert not hub.host_blocks
    assert s.source == "phone"
    assert s.network.default == LinkSpec(100.0, 2.0, 0.0)
    assert s.network.link("laptop", "phone") == s.network.link("phone", "laptop") == LinkSpec(50.0, 5.0, 0.0)
    assert s.network.link("hub", "phone") == LinkSpec(10.0, 2.0, 64.0)  # latency inherited
    assert s.network.link("hub", "laptop") == s.network.default
    assert set(s.network.links) == {("laptop", "phone"), ("hub", "phone")}
    assert s.controller == sc.ControllerSpec("resource_aware", 4, "oracle")
    assert s.raw["seed"] == 7


def test_full_scenario_events():
    s = sc.loads(FULL)
    e = s.events
    assert [ev.index for ev in e] == list(range(7))
    assert [ev.action for ev in e] == ["set_link", "memory_pressure", "memory_release",
                                       "set_compute", "fail_device", "join_device", "set_link"]
    assert e[0].change == sc.SetLink(("phone", "laptop"), 2.0, 20.0, None) and e[0].subject == "phone<->laptop"
    assert (e[1].change, e[1].at_token, e[1].at_s) == (sc.MemoryPressure("phone", 40.0), 30, None)
    assert e[2].change == sc.MemoryRelease("phone", None)
    assert (e[3].at_s, e[3].at_token, e[3].change) == (1.5, None, sc.SetCompute("laptop", 0.25))
    assert e[4].change == sc.FailDevice("laptop")
    join = e[5].change
    assert isinstance(join, sc.JoinDevice) and join.device == "tablet" and e[5].subject == "tablet"
    assert join.spec == sc.DeviceSpec("tablet", 5.0, 256.0, pytest.approx(230.4), True)
    assert join.links == {"phone": LinkSpec(300.0, 2.0, 0.0)}  # latency from network.default
    assert e[6].change == sc.SetLink(("tablet", "hub"), bandwidth_mbps=0.0)  # a joined device


def test_defaults():
    s = sc.loads("""\
version: 1
name: minimal
model: {preset: gpt-tiny}
generation: {prompt_tokens: 4, new_tokens: 8}
devices:
  - {name: a, compute_gflops: 1, memory_mib: 16}
  - {name: b, compute_gflops: 2.5, memory_mib: 16}
""")
    assert (s.seed, s.description, s.source, s.events) == (0, "", "a", ())
    assert s.network == sc.NetworkSpec(LinkSpec(100.0, 2.0, 0.0), {})
    assert s.controller == sc.ControllerSpec("resource_aware", 4, "measured")
    assert s.device("b") == sc.DeviceSpec("b", 2.5, 16.0, pytest.approx(14.4), True)
    assert s.file == "<string>"
    with pytest.raises(KeyError):
        s.device("c")


def test_ints_are_accepted_as_numbers_but_not_numbers_as_ints():
    s = sc.loads(VALID.replace("compute_gflops: 8,", "compute_gflops: 8.5,"))
    assert s.devices[0].compute_gflops == 8.5
    assert "must be an integer, got float" in str(_error(VALID.replace("new_tokens: 16", "new_tokens: 16.0")))


def test_partial_network_default_keeps_the_other_defaults():
    s = sc.loads(VALID + "network:\n  default: {latency_ms: 7}\n")
    assert s.network.default == LinkSpec(100.0, 7.0, 0.0)


def test_model_overrides_follow_derived_sizes():
    def model(body: str):
        return sc.loads(VALID.replace("model: {preset: gpt-tiny}", f"model: {body}")).model

    m = model("{preset: gpt-mini, d_model: 512}")
    assert (m.name, m.d_model, m.d_ff, m.layers, m.heads) == ("gpt-mini", 512, 2048, 4, 8)
    assert model("{preset: gpt-mini, d_model: 512, d_ff: 1000}").d_ff == 1000
    m = model("{preset: gpt-tiny, heads: 8}")
    assert (m.heads, m.kv_heads) == (8, 8)
    assert model("{preset: gpt-tiny, heads: 8, kv_heads: 2}").kv_heads == 2
    assert model("{preset: gpt-tiny, dtype: float16}").bytes_per_elem == 2
    m = model("{layers: 1, heads: 2, d_model: 32, vocab: 64}")
    assert (m.name, m.d_ff, m.kv_heads, m.context, m.dtype) == ("custom", 128, 2, 2048, "float32")


def test_real_weights_preset_with_text_prompt():
    text = """\
version: 1
name: real
model: {preset: smollm2-135m}
generation: {prompt: "The capital of France is", new_tokens: 8}
devices:
  - {name: a, compute_gflops: 10, memory_mib: 1024}
"""
    s = sc.loads(text)
    assert s.model == PRESETS["smollm2-135m"]
    assert s.generation.prompt == "The capital of France is" and s.generation.prompt_tokens == 0
    assert s.final_length == len("The capital of France is") + 8
    # restating a preset's own value is not an override
    assert sc.loads(text.replace("smollm2-135m}", "smollm2-135m, layers: 30}")).model == s.model
    err = _error(text.replace("smollm2-135m}", "smollm2-135m, dtype: float16}"))
    _assert_one_line(err, "s.yaml", "model.dtype")
    assert "real weights" in str(err)
    assert "must not be empty" in str(_error(text.replace('"The capital of France is"', '""')))


def test_feasibility_message_says_needed_and_available():
    err = _error([t for i, t, _ in BAD_SCENARIOS if i == "model_fits_nowhere"][0])
    assert err.path == "model"
    assert "gpt2-small needs" in err.message and "MiB" in err.message and "at 24 tokens" in err.message


def test_feasibility_counts_only_host_devices_and_the_source_share():
    spec = PRESETS["gpt-mini"]
    need = (cost.model_weight_bytes(spec) + cost.model_cache_bytes(spec, 24)) / sc.MIB
    pinned = cost.source_weight_bytes(spec) / sc.MIB

    def text(source_mib: float, other_mib: float, host: str = "true") -> str:
        return f"""\
version: 1
name: fit
model: {{preset: gpt-mini}}
generation: {{prompt_tokens: 8, new_tokens: 16}}
devices:
  - {{name: src, compute_gflops: 1, memory_mib: {source_mib}}}
  - {{name: b, compute_gflops: 1, memory_mib: {other_mib}, host_blocks: {host}}}
"""

    sc.loads(text(pinned + need / 2 + 0.01, need / 2 + 0.01))
    assert _error(text(pinned + need / 2 - 0.1, need / 2)).path == "model"
    assert _error(text(pinned + need / 2, need, host="false")).path == "model"


def test_events_may_use_devices_joined_earlier_at_seconds():
    text = VALID + """\
events:
  - {at_s: 1.0, action: join_device, device: {name: tab, compute_gflops: 5, memory_mib: 64}}
  - {at_s: 2.0, action: memory_pressure, device: tab, take_mib: 8}
  - {at_token: 3, action: set_compute, device: tab, factor: 2}
"""
    s = sc.loads(text)
    assert [e.subject for e in s.events] == ["tab", "tab", "tab"]
    assert "only joins at 1 s" in str(_error(text.replace("at_s: 2.0", "at_s: 0.5")))


# ---------------------------------------------------------------------------------------------
# to_dict round trip


def _round_trip(s: sc.Scenario) -> None:
    d = s.to_dict()
    json.dumps(d)  # plain data
    assert sc.parse(d, s.file) == s
    assert sc.loads(yaml.safe_dump(d, sort_keys=False), s.file) == s
    assert sc.parse(json.loads(json.dumps(d)), s.file) == s


@pytest.mark.parametrize("text", [FULL, VALID], ids=["full", "valid"])
def test_round_trip(text):
    _round_trip(sc.loads(text, "f.yaml"))


def test_round_trip_of_a_resized_and_a_custom_model():
    _round_trip(sc.loads(VALID.replace("{preset: gpt-tiny}", "{preset: gpt-mini, d_model: 128, heads: 4}")))
    _round_trip(sc.loads(VALID.replace("{preset: gpt-tiny}", "{layers: 1, heads: 2, d_model: 32, vocab: 64}")))


def test_to_dict_is_resolved():
    d = sc.loads(VALID).to_dict()
    assert d["model"] == {"preset": "gpt-tiny", "layers": 2, "heads": 4, "d_model": 64, "d_ff": 256,
                          "vocab": 256, "dtype": "float32", "kv_heads": 4, "context": 2048}
    assert d["seed"] == 0 and d["source"] == "gw"
    assert d["devices"][0] == {"name": "gw", "compute_gflops": 8.0, "memory_mib": 64.0,
                               "memory_high_mib": pytest.approx(57.6), "host_blocks": True}
    assert d["network"] == {"default": {"bandwidth_mbps": 100.0, "latency_ms": 2.0, "burst_kib": 0.0},
                            "links": []}
    assert d["controller"] == {"algorithm": "resource_aware", "interval_tokens": 4, "telemetry": "measured",
                               "window_tokens": 1}
    assert d["events"] == []


# ---------------------------------------------------------------------------------------------
# overrides


def test_with_overrides():
    s = sc.loads(FULL, "full.yaml")
    assert s.with_overrides() == s
    o = s.with_overrides(seed=3, new_tokens=10, algorithm="greedy")
    assert (o.seed, o.generation.new_tokens, o.controller.algorithm) == (3, 10, "greedy")
    assert (o.generation.prompt_tokens, o.controller.interval_tokens) == (16, 4)
    assert o.events == s.events  # events past the shortened run stay; they never fire
    assert s.seed == 7  # frozen original untouched
    o = s.with_overrides(new_tokens=100)
    assert o.final_length == 116 and o.seed == 7


@pytest.mark.parametrize(("kw", "path", "text"), [
    ({"seed": -1}, "--seed", "must be >= 0"),
    ({"seed": True}, "--seed", "must be an integer, got bool"),
    ({"new_tokens": 0}, "--tokens", "must be >= 1"),
    ({"new_tokens": 5.0}, "--tokens", "must be an integer, got float"),
    ({"new_tokens": 2040}, "--tokens", "exceeds the context"),
    ({"algorithm": "magic"}, "--algorithm", "unknown algorithm 'magic'"),
])
def test_with_overrides_validates(kw, path, text):
    s = sc.loads(FULL, "full.yaml")
    with pytest.raises(ScenarioError) as info:
        s.with_overrides(**kw)
    _assert_one_line(info.value, "full.yaml", path)
    assert info.value.path == path and text in info.value.message


def test_more_tokens_must_still_fit():
    spec = PRESETS["gpt-mini"]
    room = (cost.model_weight_bytes(spec) + cost.model_cache_bytes(spec, 100)) / sc.MIB
    s = sc.loads(f"""\
version: 1
name: tight
model: {{preset: gpt-mini}}
generation: {{prompt_tokens: 16, new_tokens: 64}}
devices:
  - {{name: src, compute_gflops: 1, memory_mib: {cost.source_weight_bytes(spec) / sc.MIB + room}}}
""")
    assert s.with_overrides(new_tokens=84).generation.new_tokens == 84
    with pytest.raises(ScenarioError, match=r"--tokens: gpt-mini needs .* at 116 tokens"):
        s.with_overrides(new_tokens=100)


# ---------------------------------------------------------------------------------------------
# shipped scenarios


def test_shipped_scenarios_exist():
    assert {p.stem for p in SHIPPED} >= {"steady", "bandwidth_drop", "memory_pressure"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_scenario_loads_and_round_trips(path):
    s = sc.load(path)
    assert s.name == path.stem and s.description
    assert path.read_text().startswith("#")  # a header saying what it shows
    _round_trip(s)


def test_bandwidth_drop_cuts_a_link_to_a_tenth():
    s = sc.load(ROOT / "scenarios" / "bandwidth_drop.yaml")
    ((ev,),) = [s.events]
    e = ev.change
    assert isinstance(e, sc.SetLink) and ev.at_token == 24 and e.bandwidth_mbps is not None
    before = s.network.link(*e.between)
    assert e.bandwidth_mbps == pytest.approx(before.bandwidth_mbps / 10)
    assert s.source in e.between  # every token crosses it


def test_memory_pressure_squeezes_one_device_but_the_model_still_fits():
    s = sc.load(ROOT / "scenarios" / "memory_pressure.yaml")
    ((ev,),) = [s.events]
    e = ev.change
    assert isinstance(e, sc.MemoryPressure) and ev.at_token == 24
    spec, n = s.model, s.final_length
    need = cost.model_weight_bytes(spec) + cost.model_cache_bytes(spec, n)
    room = {d.name: d.memory_bytes - (cost.source_weight_bytes(spec) if d.name == s.source else 0)
            for d in s.devices if d.host_blocks}
    # the co-tenant asks for less than the device has (it takes most of its free memory,
    # which depends on the placement; tests/test_scenarios.py checks the outcome) ...
    assert 0 < e.take_mib * sc.MIB < room[e.device]
    # ... while the others can still hold everything
    assert sum(room.values()) - room[e.device] >= need


def test_pure_module_imports_no_torch_or_asyncio():
    code = "import sys, testbed.scenario; print('torch' in sys.modules, 'asyncio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_scenario_is_frozen():
    s = sc.loads(VALID)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 1  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# fuzzing the loader: hypothesis-generated documents

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# examples per fuzz test, as in test_protocol.py: TESTBED_FUZZ_EXAMPLES=20000 searches longer
EXAMPLES = int(os.environ.get("TESTBED_FUZZ_EXAMPLES", "200"))

_FULL = yaml.safe_load(FULL)
_HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.sampled_from([0, -1, 1e-12, 1e300, 2**63, "1e3", "auto", "n" * 300, [], {}, "hub", "phone"]))


def _paths(doc: object, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value in a nested document."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: object, path: tuple, value: object) -> object:
    if not path:
        return value
    doc = dict(doc) if isinstance(doc, dict) else list(doc)  # type: ignore[arg-type]
    doc[path[0]] = _set(doc[path[0]], path[1:], value)  # type: ignore[index]
    return doc


@st.composite
def _documents(draw: st.DrawFn) -> object:
    """The full example scenario with one to three values replaced by hostile ones."""
    doc: object = _FULL
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        doc = _set(doc, path, draw(_HOSTILE))
    return doc


def _within_limits(s: sc.Scenario) -> None:
    for d in s.devices + tuple(j.spec for j in s.joins().values()):
        assert sc.GFLOPS_RANGE[0] <= d.compute_gflops <= sc.GFLOPS_RANGE[1]
        assert 0 < d.memory_mib <= sc.MAX_MEMORY_MIB and 0 < d.memory_high_mib <= d.memory_mib
        assert len(d.name) <= sc.MAX_NAME
    for link in (s.network.default, *s.network.links.values()):
        assert sc.MBPS_RANGE[0] <= link.bandwidth_mbps <= sc.MBPS_RANGE[1]
        assert 0 <= link.latency_ms <= sc.MAX_LATENCY_MS
    assert 1 <= s.controller.interval_tokens <= sc.MAX_INTERVAL
    assert len(s.name) <= sc.MAX_NAME and len(s.description) <= sc.MAX_DESCRIPTION
    for e in s.events:
        assert not isinstance(e.change, sc.SetCompute) or sc.FACTOR_RANGE[0] <= e.change.factor <= sc.FACTOR_RANGE[1]
        assert e.at_s is None or 0 <= e.at_s <= sc.MAX_AT_S


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_documents())
def test_fuzz_documents_are_accepted_within_limits_or_refused_in_one_line(doc: object) -> None:
    try:
        s = sc.parse(doc, "fuzz.yaml")
    except ScenarioError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz.yaml: "), str(e)
        return
    _within_limits(s)
    assert sc.parse(s.to_dict(), "fuzz.yaml") == s  # what is accepted round-trips


@settings(max_examples=EXAMPLES, deadline=None)
@given(text=st.one_of(
    st.text(max_size=300),
    st.builds(lambda d: yaml.safe_dump(d), _documents()),
    st.builds(lambda n, ch: "x: " + ch * n, st.integers(0, 3000), st.sampled_from(["[", "{", "- ", "&a [*a, "])),
))
def test_fuzz_texts_are_scenarios_or_one_line_refusals(text: str) -> None:
    try:
        sc.loads(text, "fuzz.yaml")
    except ScenarioError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz.yaml: "), str(e)


def test_migration_mechanism_is_read_and_recorded_only_when_not_the_default():
    s = sc.loads(VALID)
    assert s.controller.migration == "stop_and_copy" and "migration" not in s.to_dict()["controller"]
    pre = sc.loads(VALID.replace("controller:", "controller:\n  migration: pre_copy\n", 1)
                   if "controller:" in VALID else VALID + "controller: {migration: pre_copy}\n")
    assert pre.controller.migration == "pre_copy" and pre.to_dict()["controller"]["migration"] == "pre_copy"
    _round_trip(pre)
