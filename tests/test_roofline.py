"""The roofline device: a job takes max(FLOPs / rate, bytes moved / memory bandwidth).

Holds: on a preset device a memory-bound block takes its bytes / bandwidth and a
compute-bound one its FLOPs / rate, on the virtual clock and on the real one; slowdowns and
background load scale both; without a bandwidth the time is exactly FLOPs / rate; the
estimator agrees with the emulation within 1 % on the shipped preset scenario (oracle
telemetry, virtual clock); presets resolve, are overridable, and a wrong one is one line."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.emulation.clock import new_loop
from testbed.emulation.compute import ComputeUnit
from testbed.experiments import run as experiment
from testbed.model import cost
from testbed.model.spec import from_name
from testbed.placement.problem import DeviceState, LatencyModel, Placement, Snapshot, link_matrices
from testbed.scenario import ScenarioError, load, loads
from testbed.scenario import presets as P

from .conftest import read_csv, run_virtual, scenario_dict
from .test_optimal import check_against_exhaustive, instances

ROOT = Path(__file__).resolve().parents[1]
PI5 = P.DEVICES["raspberry-pi-5"]


def timed(clock: str, unit: ComputeUnit, flops: float, nbytes: float) -> float:
    """Emulated seconds the unit takes for one job (no host work inside it)."""
    loop = new_loop(clock)
    try:
        async def job() -> float:
            t0 = loop.time()
            _, done = await unit.run(flops, lambda: None, ready=t0, nbytes=nbytes)
            return done - t0
        return loop.run_until_complete(asyncio.wait_for(job(), 5.0))
    finally:
        loop.close()


def pi5() -> ComputeUnit:
    return ComputeUnit("pi5", PI5.compute_gflops * 1e9, PI5.memory_bandwidth_gbps * 1e9)


# gpt-32x32's ffn: decode (1 token) streams 537 MB of weights for 268 MFLOPs (memory-bound
# on a Pi 5: 31 ms against 1.7 ms); a 128-token prefill chunk does 34 GFLOPs on the same
# bytes (compute-bound: 224 ms against 32 ms)
BIG = from_name("gpt-32x32")
DECODE = (cost.span_flops(BIG, "ffn", 16, 1), cost.span_bytes(BIG, "ffn", 16, 1))
PREFILL = (cost.span_flops(BIG, "ffn", 0, 128), cost.span_bytes(BIG, "ffn", 0, 128))


def test_the_cases_are_what_they_say() -> None:
    rate, bw = PI5.compute_gflops * 1e9, PI5.memory_bandwidth_gbps * 1e9
    assert DECODE[1] / bw > 10 * DECODE[0] / rate
    assert PREFILL[0] / rate > 5 * PREFILL[1] / bw


@pytest.mark.parametrize("clock", ["virtual", "real"])
def test_memory_bound_takes_bytes_over_bandwidth(clock: str) -> None:
    want = DECODE[1] / (PI5.memory_bandwidth_gbps * 1e9)
    got = timed(clock, pi5(), *DECODE)
    if clock == "virtual":
        assert got == pytest.approx(want, rel=1e-12)
    else:  # the real clock: the job ends at its emulated finish, give or take the host's wake-up
        assert got == pytest.approx(want, abs=3e-3)
    assert got > 10 * DECODE[0] / (PI5.compute_gflops * 1e9)


@pytest.mark.parametrize("clock", ["virtual", "real"])
def test_compute_bound_takes_flops_over_rate(clock: str) -> None:
    want = PREFILL[0] / (PI5.compute_gflops * 1e9)
    got = timed(clock, pi5(), *PREFILL)
    if clock == "virtual":
        assert got == pytest.approx(want, rel=1e-12)
    else:
        assert got == pytest.approx(want, abs=3e-3)


@pytest.mark.parametrize("job,want", [(DECODE, DECODE[1] / (PI5.memory_bandwidth_gbps * 1e9 * 0.4)),
                                      (PREFILL, PREFILL[0] / (PI5.compute_gflops * 1e9 * 0.4))],
                         ids=["memory-bound", "compute-bound"])
def test_slowdown_and_load_scale_both(job: tuple[float, float], want: float) -> None:
    u = pi5()
    u.factor, u.load = 0.5, 0.2
    assert timed("virtual", u, *job) == pytest.approx(want, rel=1e-12)


def test_without_a_bandwidth_the_flop_model_exactly() -> None:
    u = ComputeUnit("d", 1.23e9)
    for flops, nbytes in (DECODE, PREFILL, (7.0, 1e12)):
        assert u.duration(flops, nbytes) == flops / 1.23e9
        assert cost.roofline_time(flops, nbytes, 1.23e9) == flops / 1.23e9


def test_span_bytes_counts_weights_cache_and_activations() -> None:
    s = from_name("gpt-mini")
    b, D = s.bytes_per_elem, s.d_model
    kv = cost.cache_bytes_per_token(s)
    # a decode step at position 9 reads 10 positions of K/V and writes one
    assert cost.span_bytes(s, "head", 9, 1) == (cost.weight_bytes(s, "head") + 10 * kv + kv
                                                + (D + s.q_per_group * s.d_head) * b)
    assert cost.span_bytes(s, "ffn", 0, 4) == cost.weight_bytes(s, "ffn") + 4 * 2 * D * b
    assert cost.span_bytes(s, "proj", 0, 1) == cost.weight_bytes(s, "proj") + 3 * D * b


def test_estimator_prices_heads_on_the_roofline() -> None:
    """Two devices, one memory-bound: the estimator's layer time uses bytes / bandwidth
    for the memory-bound device's jobs and FLOPs / rate for the other's."""
    s = from_name("gpt-mini")
    devs = (DeviceState("a", 1e9, 1 << 34, bandwidth=1e8), DeviceState("b", 1e9, 1 << 34))
    snap = Snapshot.build(s, devs, link_matrices(2, rate=1e12), 0, 8)
    m = LatencyModel(snap)
    n = 9
    hf, hb = m.head_flops(n), m.head_bytes_moved(n)
    assert m.time(0, 2 * hf, 2 * hb) == pytest.approx(2 * hb / 1e8)
    assert m.time(1, 2 * hf, 2 * hb) == 2 * hf / 1e9
    assert np.allclose(m.times(hf, hb), [max(hf / 1e9, hb / 1e8), hf / 1e9])
    on_a = Placement(s, tuple(0 for _ in s.blocks))
    on_b = Placement(s, tuple(1 for _ in s.blocks))
    assert m.token_time(on_a, n) > m.token_time(on_b, n)


def test_estimator_within_one_percent_on_the_preset_scenario(tmp_path: Path) -> None:
    scen = load(ROOT / "scenarios" / "edge_presets.yaml")
    assert scen.controller.telemetry == "oracle"
    assert all(d.memory_bandwidth_gbps is not None for d in scen.devices)
    o = run_virtual(scen, scen.controller.algorithm, tmp_path, experiment.prepare(scen))
    assert o.ok, o.status
    rows = read_csv(o.run_dir / "tokens.csv")
    # the estimate is of a token's inference: its stall (a decision's modelled cost) left out
    inference = [float(r["latency_ms"]) - float(r["stall_ms"]) for r in rows]
    err = [abs(float(r["predicted_ms"]) - t) / t for r, t in zip(rows, inference, strict=True)]
    assert len(rows) == scen.generation.new_tokens and max(err) <= 0.01, err


def scenario_text(device: dict, network: dict | None = None) -> str:
    d = scenario_dict()
    d["devices"] = [device, *d["devices"][1:]]
    d["source"] = device["name"]
    if network is not None:
        d["network"] = network
    return yaml.safe_dump(d)


def test_device_preset_resolves_and_is_overridable() -> None:
    scen = loads(scenario_text({"name": "pi", "preset": "raspberry-pi-5", "compute_gflops": 50}))
    d = scen.devices[0]
    assert (d.compute_gflops, d.memory_bandwidth_gbps, d.memory_mib) == (50, PI5.memory_bandwidth_gbps,
                                                                          PI5.memory_mib)
    assert d.bandwidth == PI5.memory_bandwidth_gbps * 1e9
    again = loads(scenario_text(d.to_dict()))
    assert again.devices[0] == d


def test_link_preset_resolves_and_is_overridable() -> None:
    scen = loads(scenario_text({"name": "pi", "preset": "raspberry-pi-5"},
                               {"default": {"preset": "wifi-6", "latency_ms": 5}}))
    assert (scen.network.default.bandwidth_mbps, scen.network.default.latency_ms) == (
        P.LINKS["wifi-6"].bandwidth_mbps, 5)


def test_without_the_new_keys_the_device_resolves_as_before() -> None:
    scen = loads(scenario_text({"name": "pi", "compute_gflops": 1.0, "memory_mib": 512}))
    d = scen.devices[0]
    assert d.bandwidth == math.inf and d.preset is None
    assert set(d.to_dict()) == {"name", "compute_gflops", "memory_mib", "memory_high_mib", "host_blocks"}


@pytest.mark.parametrize("device,where", [
    ({"name": "pi", "preset": "raspberry-pi-9"}, "devices[0].preset"),
    ({"name": "pi", "preset": "raspberry-pi-5", "memory_bandwidth_gbps": 0}, "devices[0].memory_bandwidth_gbps"),
    ({"name": "pi", "memory_bandwidth_gbps": 10, "memory_mib": 512}, "devices[0]"),
])
def test_bad_presets_are_one_line(device: dict, where: str) -> None:
    with pytest.raises(ScenarioError) as e:
        loads(scenario_text(device))
    msg = str(e.value)
    assert where in msg and "\n" not in msg, msg


def test_every_preset_has_its_sources() -> None:
    assert len(P.DEVICES) >= 6 and {"wifi-4", "wifi-5", "wifi-6", "gigabit-ethernet", "5g", "lte"} <= set(P.LINKS)
    for d in P.DEVICES.values():
        assert d.compute_gflops > 0 and d.memory_bandwidth_gbps > 0 and d.memory_mib > 0
        assert all(len(src) > 10 for src in (d.compute_source, d.bandwidth_source, d.memory_source))
    for lk in P.LINKS.values():
        assert lk.bandwidth_mbps > 0 and lk.latency_ms > 0 and lk.rate_source and lk.latency_source


def test_a_roofline_instance_differs_only_by_its_bandwidth() -> None:
    from testbed.analytic.simulate import BALANCE_RANGE, devices_at, make_instance

    a = make_instance("paper-small", 4, 8, np.random.default_rng(3))
    b = make_instance("paper-small", 4, 8, np.random.default_rng(3), roofline=True)
    assert a.memory_bandwidth is None and b.memory_bandwidth is not None
    for f in ("memory", "flops", "rate", "latency", "load"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    balance = b.flops / b.memory_bandwidth
    assert ((balance >= BALANCE_RANGE[0]) & (balance <= BALANCE_RANGE[1])).all()
    load = b.load[0]
    assert [d.bandwidth for d in devices_at(b, 0)] == pytest.approx(list(b.memory_bandwidth * (1 - load)))
    assert all(d.bandwidth == math.inf for d in devices_at(a, 0))


def test_the_paper_sweep_refuses_the_roofline(capsys: pytest.CaptureFixture[str]) -> None:
    from runners import sweep

    assert sweep.main(["paper", "--roofline"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --roofline:") and "\n" not in err


@settings(max_examples=30, deadline=None)
@given(instances(), st.lists(st.floats(-2.0, 1.0), min_size=4, max_size=4))
def test_optimal_equals_exhaustive_on_the_roofline(snap: Snapshot, balance: list[float]) -> None:
    """The exact solver prices jobs as the estimator does: on snapshots where some devices
    are memory-bound (bandwidth = FLOP/s x 10^b, a few FLOPs per byte or fewer) it still
    finds the minimum of the objective over every placement."""
    devices = tuple(dataclasses.replace(d, bandwidth=d.flops * 10 ** b) for d, b in zip(snap.devices, balance[:snap.n_devices], strict=True))
    check_against_exhaustive(dataclasses.replace(snap, devices=devices), record=False)
