"""The per-token latency estimate against the virtual-clock emulation, within 2 % on every
token (prefill included): on slow, long links where frame sizes and frames queued on one
link matter, and on every shipped scenario. Oracle telemetry, so the estimate sees the
emulator's true rates; virtual time, so no host time is in the measured latency."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from testbed.experiments import run as experiment
from testbed.model import cost, smollm2
from testbed.model.spec import from_name
from testbed.placement.problem import (
    DeviceState,
    LatencyModel,
    Placement,
    Snapshot,
    layer_views,
    link_matrices,
)
from testbed.scenario import Scenario, load
from testbed.transport.codec import encode
from testbed.transport.ws import FRAME_EXTRA

from .conftest import Fixed, make_scenario, read_csv, run_virtual

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.02
SCENARIOS = sorted(p.stem for p in (ROOT / "scenarios").glob("*.yaml"))


def token_rows(scen: Scenario, algorithm: object, out: Path) -> list[dict[str, str]]:
    o = run_virtual(scen, algorithm, out, experiment.prepare(scen))
    assert o.ok, o.status
    return read_csv(o.run_dir / "tokens.csv")


def errors(rows: list[dict[str, str]]) -> dict[int, float]:
    """Token -> relative error of the estimate."""
    return {int(r["token"]): abs(float(r["predicted_ms"]) - float(r["latency_ms"])) / float(r["latency_ms"])
            for r in rows}


def slow_scenario(preset: str = "gpt-mini", **kw: object) -> Scenario:
    """3 devices linked at 1 Mbit/s with 30 ms latency: transfers dominate every token."""
    return make_scenario(preset=preset, n_devices=3, new_tokens=4, prompt=16, algorithm="static",
                         telemetry="oracle", bandwidth_mbps=1.0, latency_ms=30.0, memory_mib=4096, **kw)


def shares_a_link(p: Placement, source: int) -> bool:
    """Some layer's input device u holds heads of the layer while proj is elsewhere: the
    head outputs follow the residual on the link u -> proj."""
    u = source
    for v in layer_views(p):
        if u in v.heads and u != v.proj:
            return True
        u = v.ffn
    return False


def test_slow_long_links_static(tmp_path: Path) -> None:
    scen = slow_scenario()
    o = run_virtual(scen, "static", tmp_path, experiment.prepare(scen))
    assert o.ok, o.status
    rows = read_csv(o.run_dir / "tokens.csv")
    assert rows[0]["phase"] == "prefill" and len(rows) == 4
    err = errors(rows)
    assert max(err.values()) <= TOLERANCE, err


@pytest.mark.parametrize("preset,kw", [("gpt-mini", {}), ("gpt-tiny", {}), ("gpt-mini", {"kv_heads": 2})],
                         ids=["gpt-mini", "gpt-tiny", "gpt-mini-gqa"])
def test_slow_long_links_heads_follow_the_residual(preset: str, kw: dict, tmp_path: Path) -> None:
    """A fixed placement where in every layer the input device keeps half the heads and
    proj, with the other half, is on another device: the outputs from the input device
    queue behind the residual on one link, and that is the critical path. ffn goes to the
    third device, the next layer's input device."""
    scen = slow_scenario(preset, **kw)
    spec = experiment.prepare(scen).model
    assign: list[int] = []
    u = 0
    for _ in range(spec.layers):
        proj, other = (u + 1) % 3, (u + 2) % 3
        heads = [u if g % 2 == 0 else proj for g in range(spec.groups)]
        assign += heads + [proj, other]  # ffn on `other`: the next layer's input device
        u = other
    p = Placement(spec, tuple(assign))
    assert shares_a_link(p, 0)
    err = errors(token_rows(scen, Fixed(assign), tmp_path))
    assert max(err.values()) <= TOLERANCE, err


def _without_events(scen: Scenario, tokens: int) -> Scenario:
    scen = scen.with_overrides(new_tokens=tokens)
    return dataclasses.replace(scen, events=(), controller=dataclasses.replace(
        scen.controller, algorithm="static", telemetry="oracle"))


def _needs_weights(name: str) -> list[pytest.MarkDecorator]:
    if name.startswith("smollm2"):
        return [pytest.mark.skipif(not smollm2.available(),
                                   reason=f"SmolLM2 weights not installed ({smollm2.PIP_HINT})")]
    return []


@pytest.mark.parametrize("name", [pytest.param(n, marks=_needs_weights(n)) for n in SCENARIOS])
def test_shipped_scenarios_static(name: str, tmp_path: Path) -> None:
    """Every shipped scenario, its events removed, a placement that never changes."""
    scen = _without_events(load(ROOT / "scenarios" / f"{name}.yaml"), 5)
    err = errors(token_rows(scen, "static", tmp_path))
    assert max(err.values()) <= TOLERANCE, err


@pytest.mark.parametrize("name", [pytest.param(n, marks=_needs_weights(n)) for n in SCENARIOS])
def test_shipped_scenarios_with_events(name: str, tmp_path: Path) -> None:
    """Every shipped scenario with its events and its own algorithm, through its first
    event and a few tokens beyond. Excluded: the tokens that re-planned with migrations or
    recovered (`migrations` > 0 or `stall_ms` > 0), since their latency includes the
    migration or recovery, which the per-token estimate leaves to the epoch objective. An
    event applies before its token starts, so the tokens at and after it are checked."""
    scen = load(ROOT / "scenarios" / f"{name}.yaml")
    first = min((e.at_token for e in scen.events), default=8)
    scen = scen.with_overrides(new_tokens=first + 4)
    scen = dataclasses.replace(scen, controller=dataclasses.replace(scen.controller, telemetry="oracle"))
    rows = token_rows(scen, scen.controller.algorithm, tmp_path)
    kept = [r for r in rows if int(r["migrations"]) == 0 and float(r["stall_ms"]) == 0.0]
    checked = {int(r["token"]) for r in kept}
    assert 0 in checked and max(checked) > first  # the prefill, and tokens after the event
    err = errors(kept)
    assert max(err.values()) <= TOLERANCE, err


# ---------------------------------------------------------------------------- frames


@pytest.mark.parametrize("name", ["gpt-tiny", "gpt-mini", "gpt2-small", "smollm2-135m"])
@pytest.mark.parametrize("tokens", [1, 16])
def test_frame_sizes_cover_the_codec(name: str, tokens: int) -> None:
    """The priced activation frames are never smaller than the encoded messages the device
    agents send, in process and over websockets, and at most a few bytes larger (the
    integer fields of small values and, for fewer than G groups, the growing headers)."""
    s = from_name(name)
    dt = getattr(torch, s.dtype)
    x = torch.zeros(tokens, s.d_model, dtype=dt)
    for seq, pos in ((1, 0), (40, 300), (900, 2000)):
        frames = [({"t": "x", "seq": seq, "layer": s.layers - 1, "pos": pos, "x": x}, cost.hidden_bytes, 4),
                  ({"t": "y", "seq": seq, "layer": 0, "pos": pos, "x": x}, cost.hidden_bytes, 4),
                  ({"t": "z", "seq": seq, "x": x}, cost.output_bytes, 2)]
        for k in sorted({1, s.groups // 2 or 1, s.groups}):
            out = torch.zeros(tokens, k * s.q_per_group * s.d_head, dtype=dt)
            h = {"t": "h", "seq": seq, "layer": s.layers - 1, "pos": pos, "groups": list(range(k)), "out": out}
            frames.append((h, lambda spec, T, extra, k=k: cost.head_output_bytes(spec, k, T, extra),
                           4 + (0 if k == s.groups else 9)))
        for msg, priced, slack in frames:
            inproc, ws = len(encode(msg)), len(encode({"due": 0.0, **msg}))
            assert ws - inproc == FRAME_EXTRA
            assert 0 <= priced(s, tokens, 0) - inproc <= slack, (msg["t"], seq, pos)
            assert 0 <= priced(s, tokens, FRAME_EXTRA) - ws <= slack, (msg["t"], seq, pos)
            if seq >= 256 and pos >= 256 and slack <= 4:  # 16-bit fields, every group: exact
                assert priced(s, tokens, 0) == inproc and priced(s, tokens, FRAME_EXTRA) == ws, msg["t"]


@pytest.mark.parametrize("burst", [0.0, 500.0, 3000.0])
@pytest.mark.parametrize("flops", [1e9, 2e5])
def test_outputs_queued_behind_the_residual_by_hand(burst: float, flops: float) -> None:
    """Every head of the layer on the input device d0, proj and ffn on d1: x and then the
    outputs go d0 -> d1 on one link. The outputs arrive when the later of two is done:
    their own transfer after the compute, or both frames streamed back to back (burst credit
    covering the first bytes of the pair). Slow compute (2e5 FLOP/s), or credit for both
    frames, hides the queue."""
    V = 2
    spec = from_name("gpt-mini")
    rate, lat = 1e6, 30e-3
    devs = [DeviceState(f"d{i}", flops, 1 << 30) for i in range(V)]
    snap = Snapshot.build(spec, devs, link_matrices(V, rate=rate, latency=lat, burst=burst), 0, 16, 1)
    n, G = 17, spec.groups
    m = LatencyModel(snap)
    x, h = cost.hidden_bytes(spec), cost.head_output_bytes(spec, G)
    compute = G * cost.decode_flops(spec, "head", n) / flops
    after = (cost.decode_flops(spec, "proj", n) + cost.decode_flops(spec, "ffn", n)) / flops
    alone = compute + max(0.0, h - burst) / rate + lat
    queued = max(0.0, x + h - burst) / rate + lat
    assert m.layer_time(0, {0: G}, 1, 1, n) == pytest.approx(max(alone, queued) + after, rel=1e-12)
    if flops == 1e9 and burst < x:
        assert queued > alone  # fast compute: the outputs wait for the residual
    elif flops < 1e9:
        assert alone > queued
