"""Families of random instances in the paper's style, and the analytic simulation of a
generation run on one of them (pure: numpy, no asyncio, no torch).

Instances (as the paper describes them): devices in tiers (about 10 % cloud-like,
30 % regional, 60 % edge) with log-normal memory (2-16 GB) and compute (1e10-1e11 FLOP/s),
links drawn from a bandwidth class (0.1-0.5 Gbit/s, or 1-40 Gbit/s) with 0.1-1 ms latency,
a prompt of 16-128 tokens, and a background load of 0-30 % of every device's memory and
compute that changes at every token.

Analytic mode: the run is simulated with the same estimator the algorithms use (the
per-token critical path of `problem.LatencyModel`, the migration delay of
`problem.migration_delay`) instead of emulated agents and real tensors, so thousands of
tokens on 48 devices and a 32-layer model take seconds. With oracle telemetry and no events
the estimator matches the emulation within 5 % (tests/test_distributed.py); results from
this mode say `mode=analytic`. The decisions follow the controller's policy
(`placement.policy`, one copy for both): the first placement before the prefill, a re-plan
at every epoch of its schedule, the soft-to-hard memory fallback, and an out-of-memory
emergency when the placement no longer fits a device's memory at a token (the next cache
append would be refused): an algorithm that re-plans re-plans at once, one that does not
stops there (as the run fails). Per token: the world's state for the token, the decision
if one is due, its modelled cost (`policy.decision_cost_s`) and the migration delay of its
moves added to that token's latency (a stall, as in the emulator), the token's latency,
each device's memory.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..common.stats import percentile
from ..common.units import DEFAULT_HIGH_SHARE, MIB, bytes_to_mbps
from ..model import cost
from ..model.spec import ModelSpec, from_name
from ..placement.policy import Decision, Policy, Stop, TokenCharge
from ..placement.problem import DeviceState, LatencyModel, Placement, Snapshot, memory_need
from ..placement.window import LoadWindow
from ..scenario.presets import DEVICES as DEVICE_PRESETS

GB = 1e9
OPT_ALGS = ["optimal", "resource_aware", "resource_aware_ls", "static", "greedy", "round_robin",
            "layer_dp", "layer_dp_dynamic", "equal_split"]
SCALE_ALGS = ["resource_aware", "resource_aware_ls", "layer_dp", "layer_dp_dynamic", "equal_split",
              "resource_aware_ls+ffn16", "equal_split+ffn16"]
SHARDED = "+ffn"  # `ALG+ffnN`: the algorithm on the same instance with the model's FFN in N shards
TIERS = (("cloud", 0.1, 16 * GB, 1e11), ("regional", 0.3, 8 * GB, 4e10), ("edge", 0.6, 3 * GB, 1.5e10))
BANDWIDTH = {"small": (0.1e9, 0.5e9), "large": (1e9, 40e9)}  # bit/s
MEMORY_RANGE = (2 * GB, 16 * GB)  # bytes per device (log-normal around its tier, clipped)
COMPUTE_RANGE = (1e10, 1e11)  # FLOP/s per device (likewise)
LATENCY_RANGE = (1e-4, 1e-3)  # s per link
PROMPT_RANGE = (16, 128)  # tokens
MAX_LOAD = 0.3  # background load: up to this fraction of memory and compute, every token
HEADROOM_WINDOW = 16  # tokens of background-load history the planner's memory view covers
# With the roofline (`make_instance(..., roofline=True)`, `runners.sweep --roofline`) a device
# also has a memory bandwidth: its FLOP/s over a machine balance (FLOPs per byte of memory
# traffic) drawn log-uniformly over the range of the device presets' peak figures
# (testbed/scenario/presets.py: from 7.5 for a Raspberry Pi 4 to 51 for a phone's GPU)
BALANCE_RANGE = (min(p.compute_gflops / p.memory_bandwidth_gbps for p in DEVICE_PRESETS.values()),
                 max(p.compute_gflops / p.memory_bandwidth_gbps for p in DEVICE_PRESETS.values()))


@dataclass(frozen=True)
class Instance:
    """One random cluster and workload. `load` is every device's background load (a
    fraction of its memory and of its compute) per token, history first."""

    ident: str
    spec: ModelSpec
    memory: np.ndarray  # bytes per device (hard limit)
    flops: np.ndarray  # FLOP/s per device, unloaded
    rate: np.ndarray  # bytes/s, [V, V]
    latency: np.ndarray  # s, [V, V]
    prompt: int
    tokens: int
    load: np.ndarray  # [HEADROOM_WINDOW + tokens, V] in [0, max_load]; token t is row HEADROOM_WINDOW + t
    bandwidth_class: str
    tiers: tuple[str, ...]
    source: int = 0
    memory_bandwidth: np.ndarray | None = None  # bytes/s per device, unloaded; None: the FLOP model

    @property
    def n_devices(self) -> int:
        return len(self.memory)


def make_instance(spec: ModelSpec | str, n_devices: int, tokens: int, rng: np.random.Generator,
                  ident: str = "", max_load: float = MAX_LOAD, bandwidth_class: str | None = None,
                  prompt: tuple[int, int] = PROMPT_RANGE, roofline: bool = False,
                  latency: tuple[float, float] = LATENCY_RANGE) -> Instance:
    """A random instance; `roofline`: devices get a memory bandwidth too (drawn after
    everything else, so the rest of the instance is the same either way); `latency`: the
    range link latencies are drawn from (s; (x, x) for every link at x)."""
    spec = from_name(spec) if isinstance(spec, str) else spec
    names = [t[0] for t in TIERS]
    probs, mems, flops = ([float(t[i]) for t in TIERS] for i in (1, 2, 3))
    tier = rng.choice(len(TIERS), size=n_devices, p=probs)
    memory = np.exp(rng.normal(np.log(np.array(mems)[tier]), 0.35)).clip(*MEMORY_RANGE)
    compute = np.exp(rng.normal(np.log(np.array(flops)[tier]), 0.35)).clip(*COMPUTE_RANGE)
    bw = bandwidth_class or str(rng.choice(list(BANDWIDTH)))
    lo, hi = BANDWIDTH[bw]
    rate = rng.uniform(lo, hi, (n_devices, n_devices)) / 8
    rate = np.minimum(rate, rate.T)
    np.fill_diagonal(rate, np.inf)
    lat = rng.uniform(*latency, (n_devices, n_devices))
    lat = np.minimum(lat, lat.T)
    np.fill_diagonal(lat, 0.0)
    p = int(rng.integers(prompt[0], prompt[1] + 1))
    tokens = min(tokens, spec.context - p)
    # the background load already ran before generation starts (HEADROOM_WINDOW tokens of
    # history), so the first plan sees it too
    load = rng.uniform(0.0, max_load, (HEADROOM_WINDOW + tokens, n_devices))
    membw = None
    if roofline:
        membw = compute / np.exp(rng.uniform(np.log(BALANCE_RANGE[0]), np.log(BALANCE_RANGE[1]), n_devices))
    return Instance(ident, spec, memory, compute, rate, lat, p, tokens, load, bw,
                    tuple(names[i] for i in tier), memory_bandwidth=membw)


def variant(inst: Instance, name: str) -> tuple[Instance, str]:
    """(the instance, the algorithm) an algorithm name of a sweep means: `ALG+ffnN` is ALG
    on the same instance with the model's FFN in N shards (`model.ffn_shards`)."""
    base, sep, shards = name.partition(SHARDED)
    if not sep:
        return inst, name
    return replace(inst, spec=replace(inst.spec, ffn_shards=int(shards))), base


@dataclass
class RunResult:
    """What one algorithm did on one instance (analytic mode)."""

    algorithm: str
    latency_ms: list[float] = field(default_factory=list)  # per generated token, stalls included
    stall_ms: list[float] = field(default_factory=list)
    migrations: int = 0
    migrated_bytes: int = 0
    oom: int = 0
    replans: int = 0
    decision_ms: list[float] = field(default_factory=list)
    peak_memory: np.ndarray | None = None  # bytes per device (blocks + caches + source share)
    status: str = "completed"

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.latency_ms)) if self.latency_ms else math.nan

    def row(self) -> dict[str, Any]:
        lat = self.latency_ms
        peak = self.peak_memory if self.peak_memory is not None else np.zeros(1)
        return {"algorithm": self.algorithm, "status": self.status, "tokens": len(lat),
                "latency_mean_ms": self.mean_ms,
                "latency_p95_ms": percentile(lat, 95),
                "stall_ms": float(np.sum(self.stall_ms)), "migrations": self.migrations,
                "migrated_bytes": self.migrated_bytes, "oom": self.oom, "replans": self.replans,
                "decision_ms_mean": float(np.mean(self.decision_ms)) if self.decision_ms else math.nan,
                "peak_device_memory_bytes": float(peak.max()), "peak_memory_sum_bytes": float(peak.sum())}


def devices_at(inst: Instance, row: int) -> tuple[DeviceState, ...]:
    """Every device as it is at row `row` of the load (token t is row HEADROOM_WINDOW + t)."""
    fixed = cost.source_weight_bytes(inst.spec)
    devices = []
    for i in range(inst.n_devices):
        mem, load = inst.memory[i], inst.load[row, i]
        taken = load * mem + (fixed if i == inst.source else 0)
        membw = math.inf if inst.memory_bandwidth is None else float(inst.memory_bandwidth[i] * (1 - load))
        devices.append(DeviceState(f"d{i}", float(inst.flops[i] * (1 - load)),
                                   int(max(0.0, DEFAULT_HIGH_SHARE * mem - taken)), True, True, int(max(0.0, mem - taken)),
                                   membw))
    return tuple(devices)


def snapshot_at(inst: Instance, t: int, seq_len: int, interval: int, current: Placement | None,
                truth: bool = False) -> Snapshot:
    """The world at token t. As the controller sees it (default): the `LoadWindow` view of
    the last HEADROOM_WINDOW tokens, compute at their mean load (measured rates are
    averages) and memory net of their largest load (the load changes every token, so a plan
    that only leaves today's load free runs out tomorrow). With `truth`, the load of token t
    itself: what the token's latency and memory actually meet."""
    now = HEADROOM_WINDOW + t
    devices = devices_at(inst, now)
    if not truth:
        window = LoadWindow(HEADROOM_WINDOW)
        for row in range(now - HEADROOM_WINDOW + 1, now):
            window.observe(row, devices_at(inst, row))
        devices = window.observe(now, devices)
    return Snapshot.build(inst.spec, devices, (inst.rate, inst.latency), inst.source, seq_len, interval, current)


def simulate(inst: Instance, algorithm: Any, interval: int = 1, decision_cost: bool = True) -> RunResult:
    """Generate `inst.tokens` tokens with `algorithm` in analytic mode, under the
    controller's policy (`placement.policy`): the first placement before the prefill, then
    decisions on its schedule and out-of-memory emergencies. Generated token t is the
    controller's token k = t + 1 (token 0 is the prefill, not simulated: the prompt's
    caches are there when token 1 starts). `decision_cost`: a decision stalls its token by
    its modelled cost, as in the emulator; off, decisions are free (the paper's model, whose
    latency is inference and migration only)."""
    res = RunResult(algorithm.name)
    policy = Policy(algorithm, interval, inst.prompt)
    spec = inst.spec
    peak = np.zeros(inst.n_devices)
    fixed = np.zeros(inst.n_devices)
    fixed[inst.source] = cost.source_weight_bytes(spec)
    window = LoadWindow(HEADROOM_WINDOW)  # the planner's view: watches every row, from the history on
    for row in range(HEADROOM_WINDOW):
        window.observe(row, devices_at(inst, row))
    try:
        seq, horizon = policy.horizon(0)
        placement = _decide(policy, res, snapshot_at(inst, 0, seq, horizon, None), "initial").placement
        for t in range(inst.tokens):
            k = t + 1
            n = policy.seq_len(k)  # positions held before this token
            charge = TokenCharge()
            world = snapshot_at(inst, t, n, interval, placement, truth=True)
            snap = world.with_(devices=window.observe(HEADROOM_WINDOW + t, world.devices))
            avail = inst.memory * (1 - inst.load[HEADROOM_WINDOW + t])  # the truth at this token
            free = avail - fixed
            reason, oom = policy.due(k), None
            if reason is None:
                over = np.flatnonzero(memory_need(snap, placement, n + 1) > free)
                if over.size:  # the next cache append would be refused
                    res.oom += 1
                    oom = [snap.devices[int(over[0])].name]
                    reason = policy.emergency("oom", k, oom)
            if reason is not None:
                d = _decide(policy, res, snap, reason)
                if decision_cost:  # the decision's modelled cost, as the controller waits it out
                    charge.add(policy.cost_s(d))
                if d.moves:
                    charge.add(d.migration_delay(world), len(d.moves),
                               sum(cost.block_bytes(spec, b, n) for b, _, _ in d.moves))
                if oom is not None:
                    policy.repaired("oom", k, len(d.moves), oom)
                placement = d.placement
            res.migrations += charge.migrations
            res.migrated_bytes += charge.migrated_bytes
            need = memory_need(snap, placement, n + 1) + fixed
            peak = np.maximum(peak, need)
            if reason is not None and (need > avail).any():
                res.oom += 1  # the plan itself does not fit today's load
            lat = LatencyModel(world).token_time(placement, n + 1) + charge.stall_s
            res.latency_ms.append(lat * 1e3)
            res.stall_ms.append(charge.stall_s * 1e3)
    except Stop as e:
        res.status = f"failed: {e}"
    res.peak_memory = peak
    return res


def _decide(policy: Policy, res: RunResult, snap: Snapshot, reason: str) -> Decision:
    w0 = time.perf_counter()  # the host's time: timing.csv only
    d = policy.decide(snap, reason)
    res.decision_ms.append((time.perf_counter() - w0) * 1e3)
    res.replans += 1
    return d


# ---------------------------------------------------------------------------- tables


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """ratio_to_optimal per row: mean latency over the optimum's on the same instance."""
    best = {(r["devices"], r["instance"]): r["latency_mean_ms"] for r in rows
            if r["algorithm"] == "optimal" and r["status"] == "completed"}
    for r in rows:
        opt = best.get((r["devices"], r["instance"]))
        ok = r["status"] == "completed" and opt is not None
        r["ratio_to_optimal"] = r["latency_mean_ms"] / opt if ok else math.nan


def optimality_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for devices in sorted({r["devices"] for r in rows}):
        for alg in OPT_ALGS:
            rs = [r for r in rows if r["devices"] == devices and r["algorithm"] == alg]
            if not rs:
                continue
            ratios = [r["ratio_to_optimal"] for r in rs if not math.isnan(r["ratio_to_optimal"])]
            failed = sum(r["status"] != "completed" for r in rs)
            out.append({"devices": devices, "algorithm": alg, "instances": len(rs),
                        "compared": len(ratios), "failed": failed,
                        "ratio_mean": float(np.mean(ratios)) if ratios else math.nan,
                        "ratio_p95": percentile(ratios, 95),
                        "ratio_max": float(np.max(ratios)) if ratios else math.nan,
                        "beats_optimal": sum(x < 1 - 1e-9 for x in ratios)})
    return out


def scale_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for devices, model in sorted({(r["devices"], r["model"]) for r in rows}):
        base = {r["instance"]: r["latency_mean_ms"] for r in rows if r["devices"] == devices
                and r["model"] == model and r["algorithm"] == "layer_dp" and r["status"] == "completed"}
        for alg in SCALE_ALGS:
            rs = [r for r in rows if r["devices"] == devices and r["model"] == model and r["algorithm"] == alg]
            if not rs:
                continue
            done = [r for r in rs if r["status"] == "completed"]
            speed = [base[r["instance"]] / r["latency_mean_ms"] for r in done if r["instance"] in base]
            out.append({"devices": devices, "model": model, "algorithm": alg, "instances": len(rs),
                        "completed": len(done), "tokens_mean": float(np.mean([r["tokens"] for r in rs])),
                        "latency_mean_ms": float(np.mean([r["latency_mean_ms"] for r in done])) if done else math.nan,
                        "speedup_vs_layer_dp": float(np.mean(speed)) if speed else math.nan,
                        "peak_device_memory_gb": float(np.mean([r["peak_device_memory_bytes"] for r in rs])) / 1e9,
                        "oom": int(sum(r["oom"] for r in rs)), "migrations_mean": float(np.mean([r["migrations"] for r in rs]))})
    return out


TIMING_COLUMNS = ("decision_ms_mean", "wall_s")  # wall-clock: depend on the machine and its load


def timing_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean decision time (wall clock) per experiment and algorithm."""
    out = []
    for exp, alg in sorted({(r["experiment"], r["algorithm"]) for r in rows}):
        ms = [float(r["decision_ms_mean"]) for r in rows if (r["experiment"], r["algorithm"]) == (exp, alg)
              and isinstance(r["decision_ms_mean"], (int, float)) and not math.isnan(r["decision_ms_mean"])]
        out.append({"experiment": exp, "algorithm": alg, "runs": len(ms),
                    "decision_ms_mean": float(np.mean(ms)) if ms else math.nan,
                    "decision_ms_max": float(np.max(ms)) if ms else math.nan})
    return out


def instance_to_scenario(inst: Instance, algorithm: str) -> dict[str, Any]:
    """The instance as a scenario, to run it in the emulator as `simulate` runs it: devices
    d0..dN (d0 the source), every link as drawn, re-planning at every token (as the
    cross-check runs it), oracle telemetry, the planner's window of
    HEADROOM_WINDOW tokens, and the background load as series for memory and compute alike.
    Analytic token t is the emulator's decode token t + 1 (token 0 is the prefill), so the
    series start HEADROOM_WINDOW - 1 tokens before the prefill: the window of the first
    decision covers the same rows of the load in both."""
    names = [f"d{i}" for i in range(inst.n_devices)]
    load = [{"device": n, "memory": inst.load[:, i].tolist(), "compute": inst.load[:, i].tolist()}
            for i, n in enumerate(names)]
    links = [{"between": [names[i], names[j]], "bandwidth_mbps": float(bytes_to_mbps(inst.rate[i, j])),
              "latency_ms": float(inst.latency[i, j] * 1e3)}
             for i in range(inst.n_devices) for j in range(i + 1, inst.n_devices)]
    return {"version": 1, "name": inst.ident or "instance", "seed": 0, "model": {"preset": inst.spec.name},
            "generation": {"prompt_tokens": inst.prompt, "new_tokens": inst.tokens + 1},
            "devices": [{"name": n, "compute_gflops": float(inst.flops[i] / 1e9),
                         "memory_mib": float(inst.memory[i] / MIB),
                         **({} if inst.memory_bandwidth is None else
                            {"memory_bandwidth_gbps": float(inst.memory_bandwidth[i] / 1e9)})}
                        for i, n in enumerate(names)],
            "source": names[inst.source],
            "network": {"default": {"bandwidth_mbps": 100, "latency_ms": 1}, "links": links},
            "controller": {"algorithm": algorithm, "interval_tokens": 1, "telemetry": "oracle",
                           "window_tokens": HEADROOM_WINDOW},
            "background_load": {"before_tokens": HEADROOM_WINDOW - 1, "devices": load}}
