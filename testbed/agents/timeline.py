"""The controller's own emulated instant (its timeline), apart from the host's.

The controller acts at emulated instants: a request leaves when the answer it follows was
due, a token starts when the previous one's logits were due, a decision's plan takes effect
when its modelled cost has passed. On the virtual clock the loop's time is exactly that
(nothing else passes between an arrival and the controller acting on it). On the real
clock the host adds its own delay (waking the controller, relaying across processes, its
Python work), which is not the emulated system's: the timeline keeps the instant of the
last thing the controller waited for (`reach`) and the controller stamps what it sends and
records with it (`now`). Messages for the controller carry their emulated arrival (due)
time for this. Owns no state beyond that instant; reads the loop's clock, no IO.
"""

from __future__ import annotations

import asyncio

from ..emulation import clock


class Timeline:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.virtual = clock.time_scale(loop) is None
        self._at = loop.time()

    def now(self) -> float:
        """The controller's emulated instant: the loop's time on the virtual clock; on the
        real clock the due time of the last thing it waited for (never ahead of the loop)."""
        return self.loop.time() if self.virtual else min(self._at, self.loop.time())

    def reach(self, due: float | None = None) -> float:
        """The controller waited for something due at `due` (None: known only now, e.g. a
        failure the host noticed); its instant moves there, never back."""
        t = self.loop.time() if due is None else min(due, self.loop.time())
        self._at = max(self._at, t)
        return self.now()

    def catch_up(self) -> float:
        """Move the instant to the loop's time; returns how far it moved (0 on the virtual
        clock). For host work that the emulated system does not do, such as the agents
        building the blocks of the deployment: the run's times then count from here."""
        gap = max(0.0, self.loop.time() - self._at) if not self.virtual else 0.0
        self._at += gap
        return gap
