"""Compute-time emulation: a device with rate C FLOP/s finishes `flops` of work `flops / C`
after it starts, one job at a time (FIFO). The real torch computation runs inside that
window; when it takes longer than the emulated time (real clock: it really does delay the
device), the job is counted as an overrun.

A job starts when its inputs were due (`ready`, the emulated arrival of the message that
asked for it) or when the previous job ended, whichever is later, not when the host got
around to it: on the real clock, decoding a message and scheduling the task take host time
that the emulated device would not spend. That host time is absorbed as long as the job's
window covers it; when it does not, the job ends late and counts as an overrun.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import TypeVar

from .clock import sleep_until

T = TypeVar("T")


class ComputeUnit:
    LATE = 2e-3  # a job that ends more than this after its emulated finish is an overrun

    def __init__(self, name: str, flops: float) -> None:
        if flops <= 0:
            raise ValueError(f"{name}: compute rate must be > 0")
        self.name = name
        self.base_flops = float(flops)
        self.factor = 1.0  # scenario slowdowns multiply the base rate
        self._lock = asyncio.Lock()  # FIFO among waiters: one job at a time
        self.jobs = 0
        self.overruns = 0
        self.overrun_s = 0.0
        self.busy_s = 0.0
        self.flops_done = 0.0
        self._free_at = -math.inf  # emulated end of the last job

    @property
    def rate(self) -> float:
        """Effective FLOP/s now."""
        return self.base_flops * self.factor

    def duration(self, flops: float) -> float:
        return flops / self.rate

    async def run(self, flops: float, fn: Callable[..., T], *args: object,
                  ready: float | None = None) -> tuple[T, float]:
        """Run fn inside the job's emulated window; returns (result, emulated finish)."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            now = loop.time()
            start = max(self._free_at, now if ready is None else min(ready, now))
            emulated = self.duration(flops)
            w0 = time.perf_counter()
            result = fn(*args)
            wall = time.perf_counter() - w0
            self.jobs += 1
            finish = start + emulated
            await sleep_until(finish)
            late = loop.time() - finish
            if wall > emulated or late > self.LATE:
                self.overruns += 1
                self.overrun_s += max(wall - emulated, late)
                finish = loop.time()  # the host could not keep up: the job really ended now
            self._free_at = finish
            self.busy_s += finish - start
            self.flops_done += flops
            return result, finish
