"""One run of a scenario with one algorithm, end to end, writing its run directory.

Owns the wiring of a run: the reference generation (computed once per scenario and seed),
the cluster (agents, links), the controller, the scenario events (at a token, or at an
emulated time), the per-token instrumentation (telemetry.csv, links.csv, memory_high), the
summary and meta.json. `runners/run.py` is the command line around it.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from .agents.cluster import Cluster, UnsupportedEvent
from .agents.controller import Controller, Options, RunFailed
from .emulation import clock as clock_mod
from .model.blocks import Reference, Tensors, WeightSource, random_prompt, weights_for
from .model.spec import ModelSpec
from .placement.registry import get_algorithm
from .results import RunWriter, summarize, windows
from .scenario import Event, Scenario

log = logging.getLogger(__name__)

TORCH_THREADS = int(os.environ.get("TESTBED_TORCH_THREADS", "1"))


class CachedWeights:
    """Weights built once per process and shared (read-only) by the reference and every
    device: building gpt2-small's blocks twice would double the set-up time."""

    def __init__(self, inner: WeightSource) -> None:
        self.inner, self.spec = inner, inner.spec
        self._blocks: dict[str, Tensors] = {}
        self._source: Tensors | None = None

    def block(self, name: str) -> Tensors:
        if name not in self._blocks:
            self._blocks[name] = self.inner.block(name)
        return self._blocks[name]

    def source(self) -> Tensors:
        if self._source is None:
            self._source = self.inner.source()
        return self._source


@dataclass
class Prepared:
    """What every algorithm's run of one scenario shares."""

    scenario: Scenario
    model: ModelSpec
    weights: WeightSource
    prompt: list[int]
    ref_ids: list[int]
    ref_logits: torch.Tensor
    prompt_text: str | None = None
    tokenizer: Any = None


def prepare(scenario: Scenario) -> Prepared:
    model = scenario.model
    weights = CachedWeights(weights_for(model, scenario.seed))
    tokenizer = None
    gen = scenario.generation
    if gen.prompt is not None:
        from .model.smollm2 import load_tokenizer

        tokenizer = load_tokenizer()
        prompt = tokenizer.encode(gen.prompt)
    else:
        prompt = random_prompt(model, scenario.seed, gen.prompt_tokens)
    ids, logits = Reference(weights).generate(prompt, gen.new_tokens)
    return Prepared(scenario, model, weights, prompt, ids, logits, gen.prompt, tokenizer)


def check_runnable(scenario: Scenario) -> None:
    """Refuse, before any run directory exists, what this build cannot emulate."""
    for e in scenario.events:
        if e.action in ("fail_device", "join_device"):
            raise UnsupportedEvent(
                f"{scenario.file}: events[{e.index}].action: {e.action!r} is not supported by "
                "this build yet (device faults arrive with the fault-handling transport)")


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def run_dir_for(out: Path, scenario: Scenario, algorithm: str, seed: int) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return out / scenario.name / f"{stamp}-{algorithm}-s{seed}"


@dataclass
class Outcome:
    algorithm: str
    run_dir: Path
    status: str
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "completed"


class _Hooks:
    """Scenario events and instrumentation, called by the controller at token boundaries."""

    def __init__(self, cluster: Cluster, writer: RunWriter, events: tuple[Event, ...],
                 progress: Callable[[int], None] | None) -> None:
        self.cluster, self.w = cluster, writer
        self.at_token: dict[int, list[Event]] = {}
        for e in events:
            if e.at_token is not None:
                self.at_token.setdefault(e.at_token, []).append(e)
        self.at_s = [e for e in events if e.at_s is not None]
        self.progress = progress
        self.controller: Controller | None = None
        self.k = 0
        self._high = {n: 0 for n in cluster.names}
        self._t0 = 0.0

    def now(self) -> float:
        return self.cluster.loop.time() - self._t0

    def start(self, t0: float) -> None:
        self._t0 = t0
        for e in self.at_s:
            self.cluster.loop.call_at(t0 + e.at_s, self._apply, e)  # type: ignore[operator]
        self.links()
        self.telemetry()

    def _apply(self, e: Event) -> None:
        detail = self.cluster.apply(e)
        self.w.event(self.now(), self.k, e.action, e.subject, detail)
        if e.action == "set_link":
            self.links()

    def before_token(self, k: int) -> None:
        self.k = k
        for e in self.at_token.get(k, []):
            self._apply(e)

    def after_token(self, k: int) -> None:
        self.telemetry()
        if self.progress:
            self.progress(k)

    def on_epoch(self, k: int) -> None:
        self.links()

    def telemetry(self) -> None:
        t = self.now()
        for name in self.cluster.names:
            a = self.cluster.agents[name]
            b = a.budget
            self.w.telemetry({
                "t_s": round(t, 9), "token": self.k, "device": name, "mem_current": b.current,
                "mem_high": b.high_bytes, "mem_max": b.max_bytes, "kv_bytes": a.kv_bytes(),
                "weights_bytes": a.weight_bytes(), "pressure_bytes": b.by_category["pressure"],
                "compute_gflops": a.compute.rate / 1e9, "mem_peak": b.peak, "over_high": int(b.over_high),
                "high_events": b.events_high, "oom_events": b.events_oom,
                "reserved_bytes": b.by_category["reserved"],
            })
            if b.events_high > self._high[name]:
                self._high[name] = b.events_high
                self.w.event(t, self.k, "memory_high", name,
                             f"current={b.current} high={b.high_bytes} max={b.max_bytes}")

    def links(self) -> None:
        t = self.now()
        belief = self.controller._belief if self.controller is not None else None
        names = self.cluster.names
        for (src, dst), lk in self.cluster.net.links.items():
            measured = math.nan
            if belief is not None and self.controller is not None and self.controller.opt.telemetry == "measured":
                measured = float(belief.rate[names.index(src), names.index(dst)]) * 8 / 1e6
            else:
                obs = lk.observed_rate()
                measured = obs * 8 / 1e6 if obs is not None else math.nan
            self.w.link({"t_s": round(t, 9), "token": self.k, "src": src, "dst": dst,
                         "bandwidth_mbps": lk.bandwidth_mbps, "measured_mbps": measured,
                         "latency_ms": lk.latency_ms, "bytes": lk.bytes_sent})


async def _run_async(prep: Prepared, algorithm: str | Any, writer: RunWriter,
                     progress: Callable[[int], None] | None, state: dict[str, Any],
                     setup: Callable[[Cluster], None] | None = None,
                     on_finish: Callable[[Cluster, Controller], None] | None = None) -> None:
    scen = prep.scenario
    faults: list[str] = []
    controller: Controller | None = None

    def on_fault(where: str, what: str) -> None:
        faults.append(f"{where}: {what}")
        writer.event(hooks.now(), hooks.k, "fault", where, what)
        if controller is not None:
            controller.fault(f"{where}: {what}")

    cluster = Cluster(scen, prep.model, prep.weights, on_fault)
    hooks = _Hooks(cluster, writer, scen.events, progress)
    alg = get_algorithm(algorithm) if isinstance(algorithm, str) else algorithm
    ctl = scen.controller
    controller = Controller(scen, prep.model, alg, cluster.source_agent, prep.weights, list(cluster.names),
                            (prep.ref_ids, prep.ref_logits), prep.prompt, writer, hooks,
                            Options(interval=ctl.interval_tokens, telemetry=ctl.telemetry),
                            cluster.oracle)
    hooks.controller = controller
    state["controller"], state["cluster"] = controller, cluster
    if setup is not None:
        setup(cluster)
    try:
        await controller.deploy()
        controller.t0 = cluster.loop.time()
        hooks.start(controller.t0)
        for k in range(scen.generation.new_tokens):
            hooks.before_token(k)
            row = await controller.produce(k)
            writer.token(row)
            hooks.after_token(k)
        state["total_s"] = cluster.loop.time() - controller.t0
        if on_finish is not None:
            on_finish(cluster, controller)
    finally:
        await controller.stop()
        await cluster.stop()


def run(prep: Prepared, algorithm: str | Any, run_dir: Path, clock: str = "real", transport: str = "inproc",
        progress: Callable[[int], None] | None = None,
        setup: Callable[[Cluster], None] | None = None,
        on_finish: Callable[[Cluster, Controller], None] | None = None) -> Outcome:
    """Run one algorithm (a registered name, or any object with `name`, `dynamic` and
    `place`) on a prepared scenario; always leaves meta.json and summary.json."""
    scen = prep.scenario
    alg_name = algorithm if isinstance(algorithm, str) else algorithm.name
    # per-head work is a few tiny matrix products: one thread avoids OpenMP spin and
    # contention (several agents share this process; on a shared machine, other processes)
    torch.set_num_threads(TORCH_THREADS)
    # `setup` and `on_finish` let tests and tools inject faults and inspect the final state
    writer = RunWriter(run_dir)
    meta: dict[str, Any] = {
        "format_version": 1, "scenario": scen.to_dict(), "scenario_file": scen.file,
        "algorithm": alg_name, "seed": scen.seed, "clock": clock, "transport": transport,
        "git_revision": git_revision(), "python": sys.version.split()[0], "torch": torch.__version__,
        "host": socket.gethostname(), "platform": platform.platform(), "start": utc_now(), "end": None,
        "status": "running", "prompt_tokens": len(prep.prompt),
    }
    writer.meta(meta)
    state: dict[str, Any] = {}
    status = "completed"
    try:
        clock_mod.run(lambda: _run_async(prep, algorithm, writer, progress, state, setup, on_finish), clock)
    except RunFailed as e:
        status = f"failed: {e}"
    except KeyboardInterrupt:
        status = "failed: interrupted"
    except Exception as e:  # a bug: keep the traceback beside the results
        status = f"failed: {type(e).__name__}: {e}"
        (run_dir / "error.log").write_text(traceback.format_exc())
    ctl: Controller | None = state.get("controller")
    summary = _summary(prep, writer, ctl, state, status)
    writer.summary(summary)
    meta.update(end=utc_now(), status=status)
    writer.meta(meta)
    writer.close()
    if status == "failed: interrupted":
        raise KeyboardInterrupt
    return Outcome(alg_name, run_dir, status, summary)


def _summary(prep: Prepared, w: RunWriter, ctl: Controller | None, state: dict[str, Any],
             status: str) -> dict[str, Any]:
    rows = w.token_rows
    st = ctl.stats if ctl is not None else None
    cluster: Cluster | None = state.get("cluster")
    jobs = overruns = 0
    peak: dict[str, int] = {}
    if cluster is not None:
        for name, a in cluster.agents.items():
            jobs += a.compute.jobs
            overruns += a.compute.overruns
            peak[name] = a.budget.peak
    ids = [int(r["token_id"]) for r in rows]
    cuts = sorted({e.at_token for e in prep.scenario.events if e.at_token is not None})
    extra: dict[str, Any] = {
        "status": status,
        "total_s": state.get("total_s", math.nan),
        "oom": st.oom if st else 0,
        "replans": st.replans if st else 0,
        "emergencies": st.emergencies if st else 0,
        "failed_migrations": st.failed_migrations if st else 0,
        "refused_migrations": st.refused_migrations if st else 0,
        "decision_ms": {"mean": sum(st.decision_ms) / len(st.decision_ms) if st and st.decision_ms else math.nan,
                        "max": max(st.decision_ms) if st and st.decision_ms else math.nan},
        "overrun_fraction": overruns / jobs if jobs else 0.0,
        "peak_memory_bytes": peak,
        "correctness": {
            "tokens_match": bool(rows) and ids == prep.ref_ids[: len(ids)] and len(ids) == len(prep.ref_ids),
            "tokens_compared": len(ids),
            "mismatches": st.mismatches if st else 0,
            "max_abs_logit_diff": st.logit_diff if st else math.nan,
        },
        "windows": windows(rows, cuts),
    }
    if prep.tokenizer is not None:
        extra["prompt_text"] = prep.prompt_text
        extra["generated_text"] = prep.tokenizer.decode(ids)
    return summarize(rows, **extra)
