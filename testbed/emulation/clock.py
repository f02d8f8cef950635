"""The one clock: the asyncio loop's time, real (dilated) or virtual.

Agents, links and the controller read time only through `loop.time()` (via `now()`) and
wait only through the loop (`sleep_until`, `loop.call_at`), so the same code runs in both
modes, and `loop.time()` is always the *emulated* time:
- `real`: `ScaledEventLoop`, asyncio's selector loop on the monotonic clock slowed down by
  a time scale K (time dilation, as in Gupta et al., "To Infinity and Beyond: Time-Warped
  Network Emulation", NSDI 2006): emulated time = (wall time - epoch) / K, and every wait
  of d emulated seconds lasts K*d on the wall clock. The host then has K times more room
  for each emulated microsecond, so its own speed (torch, asyncio, sockets) stops deciding
  the latency. K = 1 is true wall-clock speed; K below 1 runs the emulation faster than
  the wall clock, for a host faster than the emulated devices. The epoch is a Unix time,
  so agents in other processes or on other hosts share one timeline: the runner hands them
  K and the epoch when it connects (`set_time_scale`). K may change during a run (the host
  fell behind): every loop switches at one Unix instant `at` announced ahead, to K' and
  the epoch' that keeps emulated time continuous there, (at - epoch) / K = (at - epoch')
  / K'. Waits use the monotonic clock; the epoch is converted to it once. It waits with `select()` rather than epoll: epoll's timeout has
  millisecond granularity (rounded up, so timers fire up to 1 ms late), select's has
  microseconds (measured here: 0.84 ms vs 0.12 ms mean lateness). Its limit of 1024
  descriptors is far above what a run opens.
- `virtual`: `VirtualEventLoop`, whose time jumps to the next timer whenever nothing is
  ready to run, so a run takes only as long as its Python work and is deterministic for a
  given seed. (Timers with equal deadlines fire in heap order, not necessarily in the
  order they were set, but always in the same order for the same sequence of calls; code
  that needs FIFO order among equal deadlines, like a link's deliveries, enforces it.)

We use a tiny custom loop rather than the `looptime` package: looptime quantises time to
its resolution and spins dozens of no-op cycles before each jump, while here a deadline is
reached exactly (`time() == when`, so an idle link delivers at exactly 8s/bw + latency).
Pure code never calls any of this: it takes `now` as an argument.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import selectors
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..scenario.format import MAX_TIME_SCALE

CLOCKS = ("real", "virtual")


class VirtualEventLoop(asyncio.SelectorEventLoop):
    """A selector loop whose `time()` is virtual and jumps to the next scheduled timer when
    the loop would otherwise sleep. Real I/O (sockets, thread wake-ups) is still polled on
    every iteration; if nothing at all is scheduled the loop blocks on real I/O."""

    def __init__(self, start: float = 0.0) -> None:
        selector = selectors.DefaultSelector()
        super().__init__(selector)
        self._vnow = float(start)
        self._real_select = selector.select
        selector.select = self._select  # type: ignore[method-assign]  # the loop waits here: time jumps here

    def time(self) -> float:
        return self._vnow

    # asyncio runs a timer once `when < time() + _clock_resolution` (1 ns). Far into a run
    # (virtual times of about 1e7 s and beyond, e.g. a very slow device) 1 ns is below the
    # float's resolution at `time()`, a timer due exactly now never becomes ready, and the
    # loop spins at 100 % CPU without advancing: the resolution follows the clock's value.
    @property
    def _clock_resolution(self) -> float:
        return max(1e-9, 2 * math.ulp(self._vnow))

    @_clock_resolution.setter
    def _clock_resolution(self, value: float) -> None:
        pass  # BaseEventLoop.__init__ sets the monotonic clock's; ours is derived above

    def _select(self, timeout: float | None = None) -> list[Any]:
        events = self._real_select(0)
        if events or timeout == 0:
            return events
        if timeout is None:  # no timers: only outside I/O can wake us
            return self._real_select(None)
        # nothing runnable: jump exactly to the earliest deadline (asyncio has already
        # dropped cancelled handles from the head of the heap)
        heap = self._scheduled  # type: ignore[attr-defined]  # asyncio's timer heap (private, untyped)
        if heap:
            self._vnow = max(self._vnow, heap[0]._when)
        return []


class ScaledEventLoop(asyncio.SelectorEventLoop):
    """Wall-clock time slowed down `time_scale` times from `epoch` (a Unix time): `time()`
    is the emulated time, and the loop's waits (computed by asyncio in `time()` units) are
    stretched by the scale before they reach `select()`.

    A process that sleeps in `select()` wakes late: 0.3-0.4 ms on this project's virtual
    machine, which is many emulated microseconds even when dilated. A `precise` loop
    therefore sleeps until `SPIN_S` before a deadline and polls for the rest (at most that
    much CPU time per wake-up), for waits whose lateness becomes emulated time: a job whose
    arithmetic starts only when its window opens, a frame that starts through the kernel's
    shaping when its timer fires (`--links kernel`). Where the devices compute early (every
    other real-clock run) a late wake-up costs nothing emulated: the arithmetic was done
    ahead, and what a job or link hands on carries its emulated time. There the polling
    only takes the CPU from the host's own work (32 tokens of the main job in process at
    K 8: the runner's thread used 1.16 s of CPU time with it, 0.61 s without), so such runs
    do without."""

    SPIN_S = 1e-3

    def __init__(self, time_scale: float = 1.0, epoch: float | None = None, precise: bool = True) -> None:
        selector = selectors.SelectSelector()
        super().__init__(selector)
        self.spin_s = self.SPIN_S if precise else 0.0
        self._real_select = selector.select
        selector.select = self._select  # type: ignore[method-assign]  # the loop waits here: waits stretch here
        self._switch: tuple[float, float, float] | None = None  # (monotonic instant, K', epoch')
        self.scales: list[tuple[float, float]] = []  # (emulated time, K) at every change
        self.set_time_scale(time_scale, time.time() if epoch is None else epoch)

    def set_time_scale(self, time_scale: float, epoch: float, at: float | None = None) -> None:
        """Adopt a scale and an epoch, now or at Unix time `at` (timers already set keep
        their emulated deadlines, which the new mapping moves on the wall clock). A switch
        during a run gives the epoch that keeps emulated time continuous at `at`
        (`continuous_epoch`); a later call replaces a switch still pending."""
        check_time_scale(time_scale)
        offset = time.time() - time.monotonic()
        if at is not None and at > time.time():
            self._switch = (at - offset, float(time_scale), float(epoch))
            return
        self._switch = None
        self.time_scale = float(time_scale)
        self.epoch = float(epoch)
        self._mono0 = self.epoch - offset
        self.scales.append((self.time(), self.time_scale))

    def continuous_epoch(self, time_scale: float, at: float) -> float:
        """The epoch that keeps emulated time continuous at Unix time `at` under `time_scale`."""
        return at - (at - self.epoch) / self.time_scale * time_scale

    def time(self) -> float:
        m = time.monotonic()
        if self._switch is not None and m >= self._switch[0]:
            ms, k, epoch = self._switch
            self._switch = None
            e = (ms - self._mono0) / self.time_scale  # the emulated time of the switch, exactly
            self.time_scale, self.epoch = k, epoch
            self._mono0 = ms - e * k
            self.scales.append((e, k))
        return (m - self._mono0) / self.time_scale

    def _select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None or timeout <= 0:
            return self._real_select(timeout)
        wall = timeout * self.time_scale
        if self._switch is not None:  # wake at a switch of scale: waits are recomputed after it
            wall = max(0.0, min(wall, self._switch[0] - time.monotonic()))
        end = time.monotonic() + wall
        if wall > self.spin_s:
            events = self._real_select(wall - self.spin_s)
            if events or not self.spin_s:
                return events
        while True:  # the last stretch: poll instead of sleeping (see SPIN_S)
            events = self._real_select(0)
            if events or time.monotonic() >= end:
                return events


def check_time_scale(k: float) -> float:
    if isinstance(k, bool) or not isinstance(k, int | float) or not math.isfinite(k) \
            or not 0.0 < k <= MAX_TIME_SCALE:
        raise ValueError(f"time scale must be a number above 0 and at most {MAX_TIME_SCALE:g}, got {k!r}")
    return float(k)


def new_loop(clock: str, time_scale: float = 1.0, epoch: float | None = None,
             precise: bool = True) -> asyncio.AbstractEventLoop:
    """A loop of the given clock; `precise`: a real clock's waits end on time at the cost of
    polling (ScaledEventLoop)."""
    if clock == "virtual":
        return VirtualEventLoop()
    if clock == "real":
        return ScaledEventLoop(time_scale, epoch, precise)
    raise ValueError(f"unknown clock {clock!r} (expected one of {', '.join(CLOCKS)})")


def run(main: Callable[[], Any], clock: str = "real", time_scale: float = 1.0,
        epoch: float | None = None, precise: bool = True) -> Any:
    """Run the coroutine function `main` to completion on a fresh loop of the given clock
    (real: slowed down `time_scale` times, emulated time 0 at `epoch`, default now;
    `precise`: see ScaledEventLoop; the heap is steady meanwhile: see `steady_heap`)."""
    with steady_heap(clock == "real"), \
            asyncio.Runner(loop_factory=lambda: new_loop(clock, time_scale, epoch, precise)) as runner:
        return runner.run(main())


@contextlib.contextmanager
def steady_heap(on: bool = True) -> Iterator[None]:
    """Python's full garbage collection scans every object alive, and holds the loop's
    thread while it does: on the real clock that pause is emulated time (a process holding a
    model, its reference run and a test suite's objects, about 200,000 of them, paused
    130-150 ms, which at K 8 put 16-63 ms into one token). The objects alive when a run
    starts (the model, its weights, imported modules: nothing the run frees) are set aside
    for its duration (`gc.freeze`), so collections during the run scan only what the run
    itself made; at its end they rejoin the collector's oldest generation."""
    if not on:
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def now() -> float:
    return asyncio.get_running_loop().time()


def time_scale(loop: asyncio.AbstractEventLoop | None = None) -> float | None:
    """The running loop's time scale; None on the virtual clock (no wall time passes)."""
    loop = loop or asyncio.get_running_loop()
    return getattr(loop, "time_scale", None) if not isinstance(loop, VirtualEventLoop) else None


def from_wall(seconds: float, loop: asyncio.AbstractEventLoop | None = None) -> float:
    """Loop-time length of `seconds` of wall-clock time: for the host's own waits (a process
    starting, a socket connecting), which do not stretch with the emulation. On the virtual
    clock the value is returned as is."""
    k = time_scale(loop)
    return seconds / k if k else seconds


async def sleep_until(when: float) -> None:
    """Wake exactly at loop time `when` (not `now + (when - now)`, which float rounding
    can move by an ulp)."""
    loop = asyncio.get_running_loop()
    if when <= loop.time():
        await asyncio.sleep(0)
        return
    fut = loop.create_future()
    handle = loop.call_at(when, _wake, fut)
    try:
        await fut
    finally:
        handle.cancel()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class LagMonitor:
    """How late the loop wakes: a task sleeps `interval` again and again and records by
    how much each wake-up missed its deadline (a busy or starved loop shows here first)."""

    def __init__(self, interval: float = 0.01, keep: int = 100_000) -> None:
        self.interval, self.keep = interval, keep
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            if len(self.lags) < self.keep:
                self.lags.append(max(0.0, loop.time() - due))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def stats(self) -> dict[str, float]:
        xs = sorted(self.lags)
        if not xs:
            return {"samples": 0, "mean_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
        return {"samples": len(xs), "mean_ms": 1e3 * sum(xs) / len(xs),
                "p99_ms": 1e3 * xs[min(len(xs) - 1, int(0.99 * len(xs)))], "max_ms": 1e3 * xs[-1]}
