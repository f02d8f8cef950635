"""Compute-time emulation: a device with rate C FLOP/s finishes `flops` of work `flops / C`
after it starts, one job at a time (FIFO); a device with a memory bandwidth W bytes/s too
takes max(flops / C, nbytes / W) for a job that moves `nbytes` (the roofline,
`model.cost.roofline_time`). Slowdowns and background load scale C and W alike. The real torch computation runs inside that
window; when it takes longer than the emulated time (real clock: it really does delay the
device: when the torch work ends more than 5 % of the job's length after the job's emulated
finish), the job is counted as an overrun and really ends when the work did. Both are
measured on the loop's clock, so on a dilated real clock (time scale K) the host's work
counts K times less, and on the virtual clock not at all. A task that merely wakes late
after its work was done in time (the host was busy with another agent) does not delay the
job: it still ends at its emulated finish, and what it sends carries that time.

A job starts when its inputs were due (`ready`, the emulated arrival of the message that
asked for it) or when the previous job ended, whichever is later, not when the host got
around to it: on the real clock, decoding a message and scheduling the task take host time
that the emulated device would not spend. That host time is absorbed as long as the job's
window covers it; when it does not, the job ends late and counts as an overrun.

On the real clock a device may also compute early: the arithmetic starts on a worker
thread as soon as the input's content exists (`early`), and the job's window, which still
opens at the emulated arrival, commits its result; the job then overruns only if that
arithmetic is not done by the window's end. The result is known when the window opens
(`on_result`), long before it is released at the end.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, NamedTuple, TypeVar

from ..model.cost import roofline_time
from .clock import sleep_until

T = TypeVar("T")


class Ahead(NamedTuple):
    """Arithmetic run ahead of its window: its result (None: it failed, and the job computes
    it in its window) and the loop time at which it was done."""

    value: Any
    done: float


class ComputeUnit:
    # a job whose torch work ends later than this share of its emulated length after its
    # emulated finish is an overrun: it lengthened what it is part of by more than 5 %
    LATE_SHARE = 0.05
    KEEP = 4096  # recent jobs whose host share is kept (bounded)

    def __init__(self, name: str, flops: float, bandwidth: float = math.inf) -> None:
        if flops <= 0:
            raise ValueError(f"{name}: compute rate must be > 0")
        if bandwidth <= 0:
            raise ValueError(f"{name}: memory bandwidth must be > 0")
        self.name = name
        self.base_flops = float(flops)
        self.base_bandwidth = float(bandwidth)  # bytes/s; inf: the FLOP model
        self.factor = 1.0  # scenario slowdowns multiply the base rate
        self.load = 0.0  # the share a background co-tenant takes of what is left (per token)
        self._lock = asyncio.Lock()  # FIFO among waiters: one job at a time
        self.jobs = 0
        self.overruns = 0
        self.overrun_s = 0.0
        self.busy_s = 0.0
        self.flops_done = 0.0
        self.early_jobs = 0  # jobs whose arithmetic ran ahead of their window (real clock)
        self._free_at = -math.inf  # emulated end of the last job
        # per recent job: the share of its emulated window the host needed (from the start of
        # the window to the end of the torch work).
        # At time scale K a share r says that about K*r would have been just enough.
        self.host_shares: deque[float] = deque(maxlen=self.KEEP)
        # calibration: when set, every job appends (start, emulated finish, host seconds of
        # its torch work measured on the wall clock)
        self.trace: list[tuple[float, float, float]] | None = None

    @property
    def rate(self) -> float:
        """Effective FLOP/s now."""
        return self.base_flops * self.factor * (1.0 - self.load)

    @property
    def bandwidth(self) -> float:
        """Effective memory bandwidth now (bytes/s; inf without one)."""
        if self.base_bandwidth == math.inf:
            return math.inf
        return self.base_bandwidth * self.factor * (1.0 - self.load)

    def duration(self, flops: float, nbytes: float = 0.0) -> float:
        return roofline_time(flops, nbytes, self.rate, self.bandwidth)

    async def run(self, flops: float, fn: Callable[..., T], *args: object,
                  ready: float | None = None, early: Future[Ahead] | None = None,
                  on_result: Callable[[T], None] | None = None, nbytes: float = 0.0) -> tuple[T, float]:
        """Run fn inside the job's emulated window; returns (result, emulated finish).
        `nbytes`: what the job moves through memory (matters with a bandwidth only).
        `early`: the job's arithmetic (an `Ahead`), started on a worker thread when its
        input's content reached the device ahead of its emulated arrival (real clock); `fn`
        then gets its value as its first argument when the window opens (it commits it:
        cache rows, memory), and the job overruns only if that arithmetic was not done by
        the finish.
        `on_result` sees the result as soon as it is known, before the window ends (to hand
        its content on early)."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            now = loop.time()
            start = max(self._free_at, now if ready is None else min(ready, now))
            emulated = self.duration(flops, nbytes)
            w0 = time.perf_counter() if self.trace is not None else 0.0
            ahead: Ahead | None = None
            if early is None:
                result = fn(*args)
            else:
                self.early_jobs += 1
                got = early.result() if early.done() else await asyncio.wrap_future(early)
                ahead = got
                result = fn(got.value, *args)
            t1 = loop.time()
            if ahead is not None and ahead.value is not None:
                # the host's work ended when the worker finished it; a loop that merely
                # wakes late to commit it (other work, another process) does not delay it
                t1 = min(t1, ahead.done)
            if on_result is not None:
                on_result(result)
            if self.trace is not None:
                self.trace.append((start, start + emulated, time.perf_counter() - w0))
            self.jobs += 1
            finish = start + emulated
            # the host's work did not fit in the window: the device really finished late
            overran = t1 > finish + self.LATE_SHARE * emulated
            if emulated > 0:
                self.host_shares.append(max(0.0, t1 - start) / emulated)
            if overran:
                self.overruns += 1
                self.overrun_s += t1 - finish
                finish = t1
            else:
                # the result is due at `finish`; if this task wakes later (the host was busy
                # with another agent), the messages it sends still carry that time
                await sleep_until(finish)
            self._free_at = finish
            # the emulated device was busy for the job's own length: a host that fell behind
            # must not make the device look slower to the controller's measurements
            self.busy_s += emulated
            self.flops_done += flops
            return result, finish
