"""A time scale that follows the host during a real-clock run (issue: real time at the
host's speed): when the host falls behind, the run raises K rather than overrun.

Every `PERIOD_S` of wall time the runner reads what the devices did since the last look
(jobs and overruns, `World.device_rows`), what the links delivered late (control frames,
`World.link_rows`) and the reports that reached the controller after it had acted without
them (`Stats.missed_reports`); `decide` (pure) says whether to raise K and to what. A raise takes
effect at one Unix instant announced `LEAD_S` ahead (`LOCAL_LEAD_S` when every agent shares
the runner's loop) to every loop of the run (the runner's,
and each agent process's over its control channel, attached hosts included: the `clock`
operation with `at`), with the epoch that keeps emulated time continuous there
(`ScaledEventLoop.set_time_scale`). `events.csv` records each change (kind `time_scale`),
`summary.json` the scale over time (`time_scales`: [emulated s, K] from the run's start,
each change as of the first look after it took effect)
and the host's busy share. K is only raised: a host that becomes quiet again is not
followed down (a lower K would have to be proven on time first, as the calibration does).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..emulation.clock import from_wall
from ..scenario.format import MAX_TIME_SCALE

PERIOD_S = 0.05  # wall seconds between looks (a token at a small K takes about that)
WINDOW_LOOKS = 4  # a look judges the jobs since the 4th look before it (or the last raise)
LEAD_S = 0.15  # wall seconds between deciding and switching (agent processes must hear of it)
LOCAL_LEAD_S = 0.01  # the same when every loop of the run is the runner's (in process)
FACTOR = 2.0  # a raise multiplies K by this ...
SEVERE = 0.05  # ... or by its square when more than this share of the jobs overran (a host
# that lost most of its CPU at once: doubling twice, a look apart, would let more overrun)
# a look at which more than this share of the jobs done in the last looks (WINDOW_LOOKS) overran raises
# K, if more than one did (a single one is not a trend: one wake-up delayed by another
# process, the first job of heads that just moved; the run's own limit is 1 %) ...
LATE_SHARE = 0.004
MIN_JOBS = 20  # fewer jobs than this in those looks: wait for more
# ... as does one at which a report reached the controller after it had acted without it
# (a decision may differ from the virtual twin's), or a re-plan took longer than its
# modelled cost (Controller.plan: the next one, as large, would too). Control frames delivered late are
# counted for the record only: each is acted on as of its due time.


@dataclass(frozen=True)
class Totals:
    """What the devices and links did since the run's start (monotone counters)."""

    jobs: int
    overruns: int
    delivered: int
    late: int
    missed: int = 0  # reports the controller acted without (Stats.missed_reports)
    late_decisions: int = 0  # re-plans whose host time did not fit their cost (Stats.late_decisions)


def decide(k: float, since: Totals, now: Totals) -> float | None:
    """The new time scale, or None: raise by FACTOR when the jobs since `since` overran
    more than LATE_SHARE of the time (at least MIN_JOBS of them; by FACTOR squared when
    more than SEVERE), or a report reached the controller after it had acted without it, or
    a re-plan's host time did not fit its modelled cost (the next one would not either)."""
    jobs, over = now.jobs - since.jobs, now.overruns - since.overruns
    if k >= MAX_TIME_SCALE:
        return None
    if jobs >= MIN_JOBS and over > max(1, SEVERE * jobs):
        return min(MAX_TIME_SCALE, k * FACTOR * FACTOR)
    if ((jobs >= MIN_JOBS and over > max(1, LATE_SHARE * jobs)) or now.missed > since.missed
            or now.late_decisions > since.late_decisions):
        return min(MAX_TIME_SCALE, k * FACTOR)
    return None


class Adapter:
    """The run's watcher of its host: a task on the runner's loop (real clock only)."""

    def __init__(self, world: Any, hooks: Any, writer: Any) -> None:
        self.world, self.hooks, self.writer = world, hooks, writer
        self.loop = world.loop
        self.changes: list[tuple[float, float]] = []  # (emulated time from the run's start, K)
        self._task: asyncio.Task[None] | None = None
        self._moves = 0  # blocks moved and recoveries seen so far (Controller.stats)
        self._calm_from = 1  # the first token judged: the prefill, and a token that moved blocks, are not
        # agent processes (attached hosts) hear of a switch over their control channels
        self.lead_s = LEAD_S if getattr(world, "rescale", None) is not None else LOCAL_LEAD_S

    def start(self) -> None:
        self._task = self.loop.create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _moved(self) -> int:
        """Blocks moved and recoveries made so far."""
        ctl = getattr(self.hooks, "controller", None)
        return ctl.stats.migrations + len(ctl.stats.recover_ms) if ctl is not None else 0

    async def _totals(self) -> Totals:
        rows = await self.world.device_rows()
        links = await self.world.link_rows()
        ctl = getattr(self.hooks, "controller", None)
        return Totals(sum(r.jobs for r in rows), sum(r.overruns for r in rows),
                      sum(r.checked for r in links), sum(r.late for r in links),
                      ctl.stats.missed_reports if ctl is not None else 0,
                      ctl.stats.late_decisions if ctl is not None else 0)

    async def _watch(self) -> None:
        # the totals at the last WINDOW_LOOKS looks since the last raise: each look judges
        # what happened since the oldest, so a host that falls behind late in a long run is
        # not diluted by everything that went well before
        looks: deque[Totals] = deque([await self._totals()], maxlen=WINDOW_LOOKS)
        while True:
            await asyncio.sleep(from_wall(PERIOD_S, self.loop))
            now = await self._totals()
            moves = self._moved()
            if moves != self._moves:
                self._moves, self._calm_from = moves, self.hooks.k + 1
            if self.hooks.k < self._calm_from:
                # the prefill is not watched: its first jobs start with nothing computed
                # ahead and on cold caches, a one-off no scale would be raised for; nor is
                # a token that moved blocks or recovered a lost device's, whose first jobs
                # on their new devices start likewise, after the host copied their weights
                # and caches (the overruns of both still count in the run's own check)
                looks.clear()
                looks.append(now)
                continue
            since = looks[0]
            k = self.loop.time_scale
            new = decide(k, since, now)
            if new is None:
                looks.append(now)
                continue
            old = k
            plans = now.late_decisions - since.late_decisions
            await self.switch(new)
            # counted afresh from the switch: what was late before it is not news after it
            await asyncio.sleep(from_wall(self.lead_s, self.loop))
            t = self.hooks.now()  # recorded once in effect, in the token then in progress
            self.changes.append((t, new))
            self.writer.event(t, self.hooks.k, "time_scale", "host",
                              f"{old:g} -> {new:g}: {now.overruns - since.overruns} of {now.jobs - since.jobs} "
                              f"jobs overran and {now.missed - since.missed} report(s) reached the controller "
                              f"after it had acted without them in the last looks ({now.late - since.late} of "
                              f"{now.delivered - since.delivered} control frames delivered late)"
                              + (f"; {plans} re-plan(s) took longer than their modelled cost" if plans else ""))
            looks.clear()
            looks.append(await self._totals())

    async def switch(self, k: float) -> None:
        """Every loop of the run moves to scale `k` at one instant `lead_s` ahead."""
        at = time.time() + self.lead_s
        epoch = self.loop.continuous_epoch(k, at)
        self.loop.set_time_scale(k, epoch, at)
        rescale = getattr(self.world, "rescale", None)
        if rescale is not None:
            await rescale(k, epoch, at)
