"""The one clock: the asyncio loop's time, real or virtual.

Agents, links and the controller read time only through `loop.time()` (via `now()`) and
wait only through the loop (`sleep_until`, `loop.call_at`), so the same code runs in both
modes:
- `real`: asyncio's selector loop on the monotonic clock, with `select()` rather than epoll:
  epoll's timeout has millisecond granularity (rounded up, so timers fire up to 1 ms late),
  select's has microseconds (measured here: 0.84 ms vs 0.12 ms mean lateness). Its limit
  of 1024 descriptors is far above what a run opens.
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
import selectors
from collections.abc import Callable
from typing import Any

CLOCKS = ("real", "virtual")


class VirtualEventLoop(asyncio.SelectorEventLoop):
    """A selector loop whose `time()` is virtual and jumps to the next scheduled timer when
    the loop would otherwise sleep. Real I/O (sockets, thread wake-ups) is still polled on
    every iteration; if nothing at all is scheduled the loop blocks on real I/O."""

    def __init__(self, start: float = 0.0) -> None:
        super().__init__(selectors.DefaultSelector())
        self._vnow = float(start)
        self._real_select = self._selector.select
        self._selector.select = self._select  # type: ignore[method-assign]

    def time(self) -> float:
        return self._vnow

    def _select(self, timeout: float | None = None) -> list[Any]:
        events = self._real_select(0)
        if events or timeout == 0:
            return events
        if timeout is None:  # no timers: only outside I/O can wake us
            return self._real_select(None)
        # nothing runnable: jump exactly to the earliest deadline (asyncio has already
        # dropped cancelled handles from the head of the heap)
        if self._scheduled:
            self._vnow = max(self._vnow, self._scheduled[0]._when)
        return []


def new_loop(clock: str) -> asyncio.AbstractEventLoop:
    if clock == "virtual":
        return VirtualEventLoop()
    if clock == "real":
        return asyncio.SelectorEventLoop(selectors.SelectSelector())
    raise ValueError(f"unknown clock {clock!r} (expected one of {', '.join(CLOCKS)})")


def run(main: Callable[[], Any], clock: str = "real") -> Any:
    """Run the coroutine function `main` to completion on a fresh loop of the given clock."""
    with asyncio.Runner(loop_factory=lambda: new_loop(clock)) as runner:
        return runner.run(main())


def now() -> float:
    return asyncio.get_running_loop().time()


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
