"""The analytic token bucket of one directed link (pure: times in, times out).

A FIFO fluid token bucket: credit accrues at `rate` bytes/s while the
link is idle, up to `burst` bytes; a message takes what credit there is when it reaches
the head of the queue and streams the rest at `rate`, so it finishes sending
`max(0, size - credit) / rate` after it starts. Departure times are computed from the
state, never polled. A rate change applies from the instant it is made: the message being
sent keeps the bytes it has already sent and streams the rest at the new rate. Rate 0 holds
every queued message (finish time infinity) until a later change restores a rate.

Latency is not the bucket's business: the shell (link.py) adds it to the finish time.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass
class _Msg:
    id: int
    size: float
    left: float = -1.0  # bytes still to stream; < 0 until it reaches the head of the queue
    start: float = math.nan  # when it reached the head of the queue
    credit_used: float = 0.0


@dataclass(frozen=True)
class Sent:
    """A message that has finished sending."""

    id: int
    size: float
    start: float  # reached the head of the queue
    finish: float  # last byte sent
    credit_used: float  # bytes covered by burst credit (sent at once)

    @property
    def streamed(self) -> float:
        return self.size - self.credit_used


class TokenBucket:
    def __init__(self, rate: float, burst: float = 0.0, now: float = 0.0) -> None:
        if rate < 0 or burst < 0:
            raise ValueError("rate and burst must be >= 0")
        self.rate = float(rate)  # bytes per second
        self.burst = float(burst)  # bytes
        self._t = float(now)  # the state below is valid at this time
        self._credit = self.burst  # a fresh link starts with a full bucket
        self._queue: deque[_Msg] = deque()
        self._next_id = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    def credit(self, now: float) -> float:
        """Credit at `now` if nothing is sent before then (for tests and telemetry)."""
        if self._queue or self.rate <= 0:
            return self._credit if not self._queue else 0.0
        return min(self.burst, self._credit + (now - self._t) * self.rate)

    def advance(self, now: float) -> list[Sent]:
        """Move the state to `now`; return the messages that finished sending by then."""
        done: list[Sent] = []
        now = max(now, self._t)
        q = self._queue
        while q:
            m = q[0]
            if m.left < 0:  # reaches the head now: take the credit there is
                m.start = self._t
                m.credit_used = min(self._credit, m.size)
                self._credit -= m.credit_used
                m.left = m.size - m.credit_used
            if m.left > 0:
                if self.rate <= 0:
                    break
                finish = self._t + m.left / self.rate
                if finish > now:
                    m.left -= (now - self._t) * self.rate
                    self._t = now
                    return done
                self._t = finish
            q.popleft()
            done.append(Sent(m.id, m.size, m.start, self._t, m.credit_used))
        if not q and self.rate > 0:
            self._credit = min(self.burst, self._credit + (now - self._t) * self.rate)
        self._t = now
        return done

    def enqueue(self, now: float, size: float) -> tuple[int, list[Sent]]:
        """Queue a message of `size` bytes at `now`: its id, and what finished by `now`."""
        done = self.advance(now)
        mid = self._next_id
        self._next_id += 1
        self._queue.append(_Msg(mid, float(size)))
        # a message arriving at an idle link starts at once (and may finish at once)
        done += self.advance(now)
        return mid, done

    def projection(self) -> list[tuple[int, float]]:
        """(id, finish time) of every queued message under the current rate; infinity
        for messages held by a rate of 0."""
        out: list[tuple[int, float]] = []
        t, credit = self._t, self._credit
        for m in self._queue:
            if m.left < 0:
                used = min(credit, m.size)
                credit -= used
                left = m.size - used
            else:
                left = m.left
            if left > 0:
                t = t + left / self.rate if self.rate > 0 else math.inf
            out.append((m.id, t))
        return out

    def set_rate(self, now: float, rate: float | None = None, burst: float | None = None) -> list[Sent]:
        """Change rate and/or burst from `now` on; returns what finished before `now`."""
        done = self.advance(now)
        if rate is not None:
            if rate < 0:
                raise ValueError("rate must be >= 0")
            self.rate = float(rate)
        if burst is not None:
            if burst < 0:
                raise ValueError("burst must be >= 0")
            self.burst = float(burst)
            self._credit = min(self._credit, self.burst)
        return done
