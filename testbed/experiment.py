"""One run of a scenario with one algorithm, end to end, writing its run directory.

Owns the wiring of a run: the reference generation (computed once per scenario and seed),
the cluster (agents, links), the controller, the scenario events (at a token, or at an
emulated time) and background load (before every token), the per-token instrumentation (telemetry.csv, links.csv, memory_high), the
summary and meta.json. `runners/run.py` is the command line around it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import platform
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from . import hostload
from .agents.controller import Controller, Options, RunFailed
from .emulation import clock as clock_mod
from .harness.cluster import Cluster
from .harness.interface import World
from .hostload import HostMonitor
from .model.blocks import TORCH_THREADS, Reference, Tensors, WeightSource, fuse_qkv, random_prompt
from .model.spec import ModelSpec
from .model.weights import weights_for
from .placement.plugins import Plugin, PluginFailed, safe_name
from .placement.registry import instantiate
from .results import RunWriter, Tap, summarize, windows
from .scenario_records import Event, Scenario

log = logging.getLogger(__name__)

class CachedWeights:
    """Weights built once per process and shared (read-only) by the reference and every
    device: building gpt2-small's blocks twice would double the set-up time. Head blocks
    are kept with Q/K/V fused, the form a live block holds, so that the reference and the
    devices share one copy instead of each fusing its own."""

    def __init__(self, inner: WeightSource) -> None:
        self.inner, self.spec = inner, inner.spec
        self._blocks: dict[str, Tensors] = {}
        self._source: Tensors | None = None

    def block(self, name: str) -> Tensors:
        if name not in self._blocks:
            w = self.inner.block(name)
            self._blocks[name] = fuse_qkv(w) if name.startswith("head.") else w
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
    torch.set_num_threads(TORCH_THREADS)  # the reference too: see run()
    model = scenario.model
    weights = CachedWeights(weights_for(model, scenario.seed))
    tokenizer = None
    gen = scenario.generation
    if gen.prompt is not None:
        from .model.smollm2 import load_tokenizer

        tokenizer = load_tokenizer(model.gguf or None)  # a GGUF model's file, else the preset's
        prompt = tokenizer.encode(gen.prompt)
    else:
        prompt = random_prompt(model, scenario.seed, gen.prompt_tokens)
    ids, logits = Reference(weights).generate(prompt, gen.new_tokens)
    return Prepared(scenario, model, weights, prompt, ids, logits, gen.prompt, tokenizer)


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
    return out / scenario.name / f"{stamp}-{safe_name(algorithm)}-s{seed}"


class RunDirError(Exception):
    """The run directory cannot be created (nothing is left behind); the message says why."""


@dataclass
class Outcome:
    algorithm: str
    run_dir: Path
    status: str
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "completed"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run, raised once the run's files are written and its world stopped."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(f"interrupted: {outcome.run_dir}")
        self.outcome = outcome


@dataclass
class RunContext:
    """What one run gathers for its summary, filled in as it goes: a run that fails early
    leaves the rest at these defaults (the summary then says nan or 0)."""

    host_monitor: HostMonitor
    world: World | None = None  # the emulated cluster
    controller: Controller | None = None
    hooks: _Hooks | None = None
    total_s: float = math.nan  # emulated seconds from the run's start to the last token
    frames: dict[str, int] = field(default_factory=dict)  # lost, refused
    link_rows: list[dict[str, Any]] = field(default_factory=list)
    host: dict[str, Any] = field(default_factory=dict)  # HostMonitor's record
    wall_s: float = math.nan


class _Hooks:
    """Scenario events, background load and instrumentation around the controller's token loop."""

    def __init__(self, world: World, writer: RunWriter, scenario: Scenario,
                 progress: Callable[[int], None] | None, t0: float) -> None:
        self.world, self.w = world, writer
        events, bg = scenario.events, scenario.background
        # device -> [before_tokens + new_tokens, 2] shares; token k is row `before + k`
        self.before = bg.before_tokens if bg else 0
        self.background = bg.table(scenario.seed, scenario.device_names,
                                   scenario.generation.new_tokens) if bg else {}
        self.loop = asyncio.get_running_loop()
        self.at_token: dict[int, list[Event]] = {}
        for e in events:
            if e.at_token is not None:
                self.at_token.setdefault(e.at_token, []).append(e)
        self.at_s = [e for e in events if e.at_s is not None]
        self.progress = progress
        self.controller: Controller | None = None
        self.k = 0
        self.last: dict[str, dict[str, Any]] = {}  # the latest telemetry row per device
        self._t0 = t0  # the run's start: every time in the result files counts from it
        self._tasks: set[asyncio.Task[None]] = set()

    def now(self) -> float:
        return self.loop.time() - self._t0

    async def start(self) -> None:
        """Generation begins: schedule the `at_s` events (emulated seconds after the first
        token started, as the scenario format says) and take the first rows."""
        begin = self.loop.time()
        for e in self.at_s:
            self.loop.call_at(begin + e.at_s, self._later, e)  # type: ignore[operator]
        await self.links()
        await self.telemetry()

    def _later(self, e: Event) -> None:
        task = self.loop.create_task(self._apply(e))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply(self, e: Event) -> None:
        if e.action == "fail_device":  # its consequences (the controller noticing) come after
            self.w.event(self.now(), self.k, e.action, e.subject, "the device stops abruptly")
            await self.world.apply(e)
            return
        detail = await self.world.apply(e)
        self.w.event(self.now(), self.k, e.action, e.subject, detail)
        if e.action == "set_link":
            await self.links()

    async def load(self, k: int) -> None:
        """Token k's background load (k < 0: before the run, when the controller watched it)."""
        if self.background:
            row = self.before + k
            await self.world.background({n: (float(t[row, 0]), float(t[row, 1]))
                                         for n, t in self.background.items()})

    async def before_token(self, k: int) -> None:
        self.k = k
        await self.load(k)
        for e in self.at_token.get(k, []):
            await self._apply(e)

    async def after_token(self, k: int) -> None:
        await self.telemetry()
        if self.progress:
            self.progress(k)

    async def on_epoch(self, k: int) -> None:
        await self.links()

    async def telemetry(self) -> None:
        t = self.now()
        for r in await self.world.device_rows():
            m, name = r["memory"], r["device"]
            row = {
                "t_s": round(t, 9), "token": self.k, "device": name, "mem_current": m["current"],
                "mem_high": m["high_bytes"], "mem_max": m["max_bytes"], "kv_bytes": r["kv_bytes"],
                "weights_bytes": r["weights_bytes"], "pressure_bytes": m["pressure_bytes"],
                "compute_gflops": r["compute_flops"] / 1e9, "mem_peak": m["peak"],
                "over_high": int(m["current"] > m["high_bytes"]), "high_events": m["high"],
                "oom_events": m["oom"], "reserved_bytes": m["reserved_bytes"],
                "background_bytes": m["background_bytes"],
            }
            self.w.telemetry(row)
            prev = self.last.get(name)
            if m["high"] > (prev["high_events"] if prev else 0):
                self.w.event(t, self.k, "memory_high", name,
                             f"current={m['current']} high={m['high_bytes']} max={m['max_bytes']}")
            self.last[name] = {**row, "jobs": r["jobs"], "overruns": r["overruns"]}

    async def links(self) -> None:
        t = self.now()
        ctl = self.controller
        belief = ctl.belief if ctl is not None and ctl.opt.telemetry == "measured" else None
        for r in await self.world.link_rows():
            measured = r["observed_mbps"] if r["observed_mbps"] is not None else math.nan
            if belief is not None and r["src"] in ctl.devices and r["dst"] in ctl.devices \
                    and len(ctl.devices) == len(belief.devices):  # type: ignore[union-attr]
                i, j = ctl.devices.index(r["src"]), ctl.devices.index(r["dst"])  # type: ignore[union-attr]
                measured = float(belief.rate[i, j]) * 8 / 1e6
            self.w.link({"t_s": round(t, 9), "token": self.k, "src": r["src"], "dst": r["dst"],
                         "bandwidth_mbps": r["bandwidth_mbps"], "measured_mbps": measured,
                         "latency_ms": r["latency_ms"], "bytes": r["bytes"]})

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _run_async(prep: Prepared, algorithm: str | Any, writer: RunWriter,
                     progress: Callable[[int], None] | None, ctx: RunContext,
                     transport: str = "inproc", processes: bool = False,
                     setup: Callable[[Any], None] | None = None,
                     on_finish: Callable[[Any, Controller], None] | None = None,
                     attach: dict[str, str] | None = None) -> None:
    scen = prep.scenario
    controller: Controller | None = None
    hooks: _Hooks | None = None

    def on_fault(where: str, what: str) -> None:
        writer.event(hooks.now() if hooks else 0.0, hooks.k if hooks else 0, "fault", where, what)
        if controller is not None:
            controller.fault(f"{where}: {what}")

    def on_lost(device: str, why: str) -> None:
        """An agent gone without a scenario event (killed from outside, crashed, hung): a
        lost device, recovered like `fail_device`."""
        if controller is None:
            on_fault(device, why)
        else:
            controller.device_lost(device, why)

    world = make_world(prep, transport, processes, on_fault, attach, on_lost)
    ctx.world = world
    try:
        await world.start()
        # the run's start, once its agents are up: every time in the result files counts from
        # here (the deployment's events included), in every mode
        t0 = world.loop.time()
        hooks = _Hooks(world, writer, scen, progress, t0)
        alg = instantiate(algorithm)
        ctl = scen.controller
        controller = Controller(scen, prep.model, alg, world.port(), (prep.ref_ids, prep.ref_logits),
                                prep.prompt, writer, hooks,
                                Options(interval=ctl.interval_tokens, telemetry=ctl.telemetry,
                                        frame_extra=world.frame_extra, window=ctl.window_tokens),
                                world.oracle)
        controller.t0 = t0
        hooks.controller = controller
        ctx.controller, ctx.hooks = controller, hooks
        if setup is not None:
            setup(world)
        for k in range(-hooks.before, 0):  # the background load ran before the run, watched
            await hooks.load(k)
            await controller.observe(k)
        await hooks.load(0)
        await controller.deploy()
        await hooks.start()
        for k in range(scen.generation.new_tokens):
            await hooks.before_token(k)
            row = await controller.produce(k)
            writer.token(row)
            await hooks.after_token(k)
        ctx.total_s = world.loop.time() - controller.t0
        ctx.frames = await world.frame_counts()
        ctx.frames["refused"] += controller.refusals.total
        ctx.link_rows = await world.link_rows()
        ctx.host = ctx.host_monitor.stop(world.pids())
        if on_finish is not None:
            done = on_finish(world, controller)
            if inspect.isawaitable(done):
                await done
    finally:
        if hooks is not None:
            await hooks.stop()
        if controller is not None:
            await controller.stop()
        await world.stop()


DISTORTED = 0.02  # more than this fraction of jobs or deliveries overran: results distorted


def fidelity(clock: str, time_scale: float, overrun: float, late: float, share: float,
             host: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's check of itself: on the real clock, did the host keep up with the emulated
    windows? `share` is the 99th percentile, over recent jobs of every device, of the share
    of its emulated window the host needed: about `time_scale * share` would have been just
    enough. A distorted run suggests one and a half times that (at least twice the scale
    used, since an overrun also delays the jobs behind it). `host` (HostMonitor) tells
    whether other processes took a good part of the machine meanwhile."""
    if clock != "real":
        return {"distorted": False, "reason": "virtual clock: the host's speed does not enter"}
    needed = round(time_scale * share, 2)
    worst = max(overrun, late)
    if worst <= DISTORTED:
        return {"distorted": False, "needed_time_scale": needed,
                "reason": f"{overrun:.1%} of jobs and {late:.1%} of deliveries overran (limit {DISTORTED:.0%})"}
    suggest = math.ceil(min(clock_mod.MAX_TIME_SCALE, max(2.0 * time_scale, 1.5 * needed)))
    busy = ""
    if hostload.loaded(host):
        busy = (f"; other processes took {hostload.other_share(host):.1f} of the host's "
                f"{host['cpus']} CPUs meanwhile")  # type: ignore[index]
    return {"distorted": True, "needed_time_scale": needed, "suggested_time_scale": suggest,
            "reason": f"{overrun:.1%} of jobs and {late:.1%} of deliveries overran their emulated "
                      f"windows at time scale {time_scale:g} (limit {DISTORTED:.0%}): the host's speed "
                      f"entered the results; about --time-scale {suggest} would fit{busy}"}


def make_world(prep: Prepared, transport: str, processes: bool, on_fault: Callable[[str, str], None],
               attach: dict[str, str] | None = None,
               on_lost: Callable[[str, str], None] | None = None) -> World:
    """The emulated cluster for a run: agents in this process over in-process queues or
    websockets, or agents in their own processes (websockets), some maybe on other hosts."""
    if processes or attach:
        from .harness.remote import ProcessCluster

        return ProcessCluster(prep.scenario, prep.model, on_fault, attach=attach, on_lost=on_lost)
    if transport == "ws":
        from .harness.wscluster import WsCluster

        return WsCluster(prep.scenario, prep.model, prep.weights, on_fault)
    return Cluster(prep.scenario, prep.model, prep.weights, on_fault)


def run(prep: Prepared, algorithm: str | Any, run_dir: Path, clock: str = "real", transport: str = "inproc",
        progress: Callable[[int], None] | None = None, processes: bool = False,
        attach: dict[str, str] | None = None,
        setup: Callable[[Any], None] | None = None,
        on_finish: Callable[[Any, Controller], None] | None = None,
        time_scale: float = 1.0, calibration: dict[str, Any] | None = None,
        tap: Tap | None = None) -> Outcome:
    """Run one algorithm (a registered name, a loaded `Plugin`, or any object with `name`,
    `dynamic` and `place`) on a prepared scenario; always leaves meta.json and summary.json.
    A plug-in that fails fails only this run: its reason and traceback go to meta.json's
    `error`. On the real clock, emulated time runs `time_scale` times slower than the wall
    clock (`calibration`: how that scale was chosen, recorded in meta.json). `tap` sees every
    result row as it is written (the live view)."""
    scen = prep.scenario
    alg_name = algorithm if isinstance(algorithm, str) else algorithm.name
    # per-head work is a few tiny matrix products: one thread avoids OpenMP spin and
    # contention (several agents share this process; on a shared machine, other processes)
    torch.set_num_threads(TORCH_THREADS)
    # `setup` and `on_finish` let tests and tools inject faults and inspect the final state
    try:
        writer = RunWriter(run_dir, tap)
    except OSError as e:
        raise RunDirError(f"cannot create the run directory {run_dir}: {e.strerror or e}") from None
    if clock == "virtual":
        time_scale = 1.0
    meta: dict[str, Any] = {
        "format_version": 1, "scenario": scen.to_dict(), "scenario_file": scen.file,
        "algorithm": alg_name, "seed": scen.seed, "clock": clock,
        "time_scale": time_scale if clock == "real" else None,
        "time_scale_calibration": calibration if clock == "real" else None,
        "transport": transport,
        "processes": processes or bool(attach), "attached": sorted(attach or {}),
        "git_revision": git_revision(), "python": sys.version.split()[0], "torch": torch.__version__,
        "host": socket.gethostname(), "platform": platform.platform(), "start": utc_now(), "end": None,
        "status": "running", "prompt_tokens": len(prep.prompt),
    }
    if isinstance(algorithm, Plugin):
        meta["plugin"] = algorithm.origin
    writer.meta(meta)
    ctx = RunContext(HostMonitor())
    status = "completed"
    wall0 = time.perf_counter()
    try:
        clock_mod.run(lambda: _run_async(prep, algorithm, writer, progress, ctx, transport, processes,
                                         setup, on_finish, attach), clock, time_scale)
    except RunFailed as e:
        status = f"failed: {e}"
        if e.error is not None:
            meta["error"] = e.error
    except PluginFailed as e:  # its constructor raised
        status = f"failed: {e}"
        meta["error"] = e.record()
    except KeyboardInterrupt:
        status = "failed: interrupted"
    except (Exception, SystemExit) as e:  # a bug: keep the traceback beside the results
        status = f"failed: {type(e).__name__}: {e}"
        (run_dir / "error.log").write_text(traceback.format_exc())
    ctx.wall_s = time.perf_counter() - wall0
    summary = _summary(prep, writer, ctx, status, clock, time_scale)
    writer.summary(summary)
    meta.update(end=utc_now(), status=status, fidelity=summary["fidelity"])
    writer.meta(meta)
    writer.close()
    outcome = Outcome(alg_name, run_dir, status, summary)
    if status == "failed: interrupted":
        raise Interrupted(outcome)
    return outcome


def _summary(prep: Prepared, w: RunWriter, ctx: RunContext,
             status: str, clock: str = "virtual", time_scale: float = 1.0) -> dict[str, Any]:
    rows = w.token_rows
    st = ctx.controller.stats if ctx.controller is not None else None
    hooks = ctx.hooks
    last = hooks.last if hooks is not None else {}
    jobs = sum(r["jobs"] for r in last.values())
    overruns = sum(r["overruns"] for r in last.values())
    links = ctx.link_rows
    delivered = sum(r.get("checked", 0) for r in links)  # frames that are not re-timed
    late = sum(r.get("late", 0) for r in links)
    share = max((r.get("host_share_p99", 0.0) for r in last.values()), default=0.0)
    peak = {name: r["mem_peak"] for name, r in last.items()}
    ids = [int(r["token_id"]) for r in rows]
    cuts = sorted({e.at_token for e in prep.scenario.events if e.at_token is not None})
    extra: dict[str, Any] = {
        "status": status,
        "total_s": ctx.total_s,
        "emulated_s": ctx.total_s,
        "wall_s": ctx.wall_s,
        "time_scale": time_scale if clock == "real" else None,
        "oom": st.oom if st else 0,
        "replans": st.replans if st else 0,
        "emergencies": st.emergencies if st else 0,
        "failed_migrations": st.failed_migrations if st else 0,
        "refused_migrations": st.refused_migrations if st else 0,
        "decision_ms": {"mean": sum(st.decision_ms) / len(st.decision_ms) if st and st.decision_ms else math.nan,
                        "max": max(st.decision_ms) if st and st.decision_ms else math.nan},
        "stalls": st.stalls if st else 0,
        "frames_lost": ctx.frames.get("lost", 0),  # to or from failed devices
        "frames_refused": ctx.frames.get("refused", 0),  # malformed, from the wire
        "recover_ms": st.recover_ms if st else [],
        "overrun_fraction": overruns / jobs if jobs else 0.0,
        "late_delivery_fraction": late / delivered if delivered else 0.0,
        "fidelity": fidelity(clock, time_scale, overruns / jobs if jobs else 0.0,
                             late / delivered if delivered else 0.0, share, ctx.host),
        "host": ctx.host,
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
