"""One run of a scenario with one algorithm, end to end, writing its run directory.

Owns the run's course: its directory and meta.json, the world started and stopped, the
controller built and driven token by token with the scenario's hooks (hooks.py), the
outcome (completed, failed with its reason, interrupted), and the summary written whatever
happened (verdict.py). What it runs on is prepared once per scenario (prepare.py); which
world it runs in, worlds.py says. `runners/run.py` is the command line around it; the names
a caller needs (`prepare`, `Prepared`, `make_world`, `git_revision`) are importable here.
"""

from __future__ import annotations

import inspect
import logging
import platform
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ..agents.controller import Controller, Options, RunFailed
from ..emulation import clock as clock_mod
from ..model.blocks import TORCH_THREADS
from ..placement.plugins import Plugin, PluginFailed, safe_name
from ..placement.registry import instantiate
from ..results.write import RunWriter, Tap
from ..scenario.records import Scenario
from .adapt import Adapter
from .hooks import RunHooks
from .hostload import HostMonitor
from .prepare import Prepared, prepare
from .provenance import git_revision, utc_now
from .verdict import RunContext, summarize_run
from .worlds import make_world

__all__ = ["Interrupted", "Outcome", "Prepared", "RunDirError", "git_revision", "make_world", "prepare", "run",
           "run_dir_for"]


log = logging.getLogger(__name__)


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


async def _run_async(prep: Prepared, algorithm: str | Any, writer: RunWriter,
                     progress: Callable[[int], None] | None, ctx: RunContext,
                     transport: str = "inproc", processes: bool = False,
                     setup: Callable[[Any], None] | None = None,
                     on_finish: Callable[[Any, Controller], object] | None = None,
                     attach: dict[str, str] | None = None, links: str = "emulated",
                     adapt: bool = False, framing: int = 0) -> None:
    scen = prep.scenario
    controller: Controller | None = None
    hooks: RunHooks | None = None
    adapter: Adapter | None = None

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
            controller.recovery.device_lost(device, why)

    world = make_world(prep, transport, processes, on_fault, attach, on_lost, links, framing)
    ctx.world = world
    try:
        await world.start()
        # the run's start, once its agents are up: every time in the result files counts from
        # here (the deployment's events included), in every mode
        t0 = world.loop.time()
        hooks = RunHooks(world, writer, scen, progress, t0)
        alg = instantiate(algorithm)
        ctl = scen.controller
        controller = Controller(scen, prep.model, alg, world.port(), (prep.ref_ids, prep.ref_logits),
                                prep.prompt, writer, hooks,
                                Options(interval=ctl.interval_tokens, telemetry=ctl.telemetry,
                                        frame_extra=world.frame_extra, window=ctl.window_tokens,
                                        migration=ctl.migration),
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
        hooks.skip(controller.skip_deployment_host_time())
        await hooks.start()
        if adapt and clock_mod.time_scale(world.loop) is not None:  # the real clock follows its host
            adapter = ctx.adapter = Adapter(world, hooks, writer)
            adapter.start()
        for k in range(scen.generation.new_tokens):
            await hooks.before_token(k)
            row = await controller.produce(k)
            writer.token(row)
            await hooks.after_token(k)
        if adapter is not None:
            await adapter.stop()
        await controller.finish()
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
        if adapter is not None:
            await adapter.stop()
        if hooks is not None:
            await hooks.stop()
        if controller is not None:
            await controller.stop()
        await world.stop()


def run(prep: Prepared, algorithm: str | Any, run_dir: Path, clock: str = "real", transport: str = "inproc",
        progress: Callable[[int], None] | None = None, processes: bool = False,
        attach: dict[str, str] | None = None,
        setup: Callable[[Any], None] | None = None,
        on_finish: Callable[[Any, Controller], object] | None = None,
        time_scale: float = 1.0, calibration: dict[str, Any] | None = None,
        tap: Tap | None = None, links: str = "emulated", adapt: bool = True, framing: int = 0) -> Outcome:
    """Run one algorithm (a registered name, a loaded `Plugin`, or any object with `name`,
    `dynamic` and `place`) on a prepared scenario; always leaves meta.json and summary.json.
    A plug-in that fails fails only this run: its reason and traceback go to meta.json's
    `error`. On the real clock, emulated time runs `time_scale` times slower than the wall
    clock (`calibration`: how that scale was chosen, recorded in meta.json). `tap` sees every
    result row as it is written (the live view). `links="kernel"` (agent processes only):
    the links are veth pairs between network namespaces shaped by the kernel's tbf
    (testbed/harness/kernelworld.py); meta.json's `kernel_links` says how. `adapt`: on the
    real clock, raise the time scale when the host falls behind (adapt.py). `framing`: in
    process, every frame is charged this many bytes more, the framing of the websocket
    transport (`worlds.twin_framing`): the virtual twin of a run over websockets (meta.json's
    `charged_framing`)."""
    if framing and (transport != "inproc" or processes or attach):
        raise ValueError("framing is charged in process only: websocket frames carry their own")
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
        "processes": processes or bool(attach), "attached": sorted(attach or {}), "links": links,
        "git_revision": git_revision(), "python": sys.version.split()[0], "torch": torch.__version__,
        "host": socket.gethostname(), "platform": platform.platform(), "start": utc_now(), "end": None,
        "status": "running", "prompt_tokens": len(prep.prompt),
    }
    if isinstance(algorithm, Plugin):
        meta["plugin"] = algorithm.origin
    if framing:
        meta["charged_framing"] = framing
    writer.meta(meta)
    ctx = RunContext(HostMonitor())
    status = "completed"
    wall0 = time.perf_counter()
    try:
        clock_mod.run(lambda: _run_async(prep, algorithm, writer, progress, ctx, transport, processes,
                                         setup, on_finish, attach, links, adapt, framing), clock, time_scale,
                      precise=links == "kernel")  # otherwise the devices compute early
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
    kw = getattr(ctx.world, "kernel", None)
    if kw is not None:
        meta["kernel_links"] = kw.info()
    summary = summarize_run(prep, writer, ctx, status, clock, time_scale)
    writer.summary(summary)
    meta.update(end=utc_now(), status=status, fidelity=summary["fidelity"])
    writer.meta(meta)
    writer.close()
    outcome = Outcome(alg_name, run_dir, status, summary)
    if status == "failed: interrupted":
        raise Interrupted(outcome)
    return outcome
