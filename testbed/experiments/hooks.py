"""Around the controller's token loop: scenario events (at a token, or at an emulated time),
background load before every token, and the per-token instrumentation (telemetry.csv,
links.csv, memory_high events, progress).

Owns `RunHooks`, which implements the hooks interface the controller calls (agents/parts.py)
and keeps the latest `DeviceRow` of every device for the run's summary. Reads the world only through
its interface (harness/interface.py).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from ..agents.controller import Controller
from ..common.units import bytes_to_mbps
from ..harness.interface import World
from ..harness.rows import DeviceRow
from ..results.write import RunWriter
from ..scenario.records import Event, Scenario


class RunHooks:
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
        self.last: dict[str, DeviceRow] = {}  # the latest row per device
        self._t0 = t0  # the run's start: every time in the result files counts from it
        self._tasks: set[asyncio.Task[None]] = set()

    def now(self) -> float:
        return self.loop.time() - self._t0

    def skip(self, seconds: float) -> None:
        """The run's start moves forward (`Controller.skip_deployment_host_time`)."""
        self._t0 += seconds

    async def start(self) -> None:
        """Generation begins: schedule the `at_s` events (emulated seconds after the first
        token started, as the scenario format says) and take the first rows."""
        begin = self.loop.time()
        for e in self.at_s:
            assert e.at_s is not None  # at_s events only
            self.loop.call_at(begin + e.at_s, self._later, e)
        await self.links()
        await self.telemetry()

    def _later(self, e: Event) -> None:
        task = self.loop.create_task(self._apply(e))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply(self, e: Event, at: float | None = None) -> None:
        """Apply `e` as of loop time `at` (default now)."""
        t = self.now() if at is None else min(at, self.loop.time()) - self._t0
        if e.action == "fail_device":  # its consequences (the controller noticing) come after
            self.w.event(t, self.k, e.action, e.subject, "the device stops abruptly")
            await self.world.apply(e, at)
            return
        detail = await self.world.apply(e, at)
        self.w.event(t, self.k, e.action, e.subject, detail)
        if e.action == "set_link":
            await self.links()

    async def load(self, k: int) -> None:
        """Token k's background load (k < 0: before the run, when the controller watched it)."""
        if self.background:
            row = self.before + k
            await self.world.background({n: (float(t[row, 0]), float(t[row, 1]))
                                         for n, t in self.background.items()})

    async def before_token(self, k: int) -> None:
        """Token k is about to start: its background load and its events, as of the
        controller's instant (where token k starts; the host gets here a little later on
        the real clock)."""
        self.k = k
        await self.load(k)
        at = self.controller.timeline.now() if self.controller is not None else None
        for e in self.at_token.get(k, []):
            await self._apply(e, at)

    async def after_token(self, k: int) -> None:
        await self.telemetry()
        if self.progress:
            self.progress(k)

    async def on_epoch(self, k: int) -> None:
        await self.links()

    async def telemetry(self) -> None:
        t = self.now()
        for r in await self.world.device_rows():
            m, name = r.memory, r.device
            self.w.telemetry({
                "t_s": round(t, 9), "token": self.k, "device": name, "mem_current": m.current,
                "mem_high": m.high_bytes, "mem_max": m.max_bytes, "kv_bytes": r.kv_bytes,
                "weights_bytes": r.weights_bytes, "pressure_bytes": m.pressure_bytes,
                "compute_gflops": r.compute_flops / 1e9, "mem_peak": m.peak,
                "over_high": int(m.current > m.high_bytes), "high_events": m.high,
                "oom_events": m.oom, "reserved_bytes": m.reserved_bytes,
                "background_bytes": m.background_bytes,
            })
            prev = self.last.get(name)
            if m.high > (prev.memory.high if prev else 0):
                self.w.event(t, self.k, "memory_high", name, f"current={m.current} high={m.high_bytes} max={m.max_bytes}")
            self.last[name] = r

    async def links(self) -> None:
        t = self.now()
        ctl = self.controller
        belief = ctl.belief if ctl is not None and ctl.opt.telemetry == "measured" else None
        devices = ctl.devices if ctl is not None else []
        for r in await self.world.link_rows():
            measured = r.observed_mbps if r.observed_mbps is not None else math.nan
            if belief is not None and r.src in devices and r.dst in devices and len(devices) == len(belief.devices):
                i, j = devices.index(r.src), devices.index(r.dst)
                measured = bytes_to_mbps(float(belief.rate[i, j]))
            self.w.link({"t_s": round(t, 9), "token": self.k, "src": r.src, "dst": r.dst,
                         "bandwidth_mbps": r.bandwidth_mbps, "measured_mbps": measured,
                         "latency_ms": r.latency_ms, "bytes": r.bytes})

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
