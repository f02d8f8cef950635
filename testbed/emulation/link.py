"""An emulated directed link: the token bucket plus latency, driven by the loop's timers.

`EmulatedLink.send(frame)` queues the frame's bytes in the bucket, computes when its last
byte leaves, and schedules delivery `latency` later with `loop.call_at` (pipelined: a second
frame does not wait for the first one's latency). Deliveries keep FIFO order. A rate or
latency change re-projects the frames still being sent and moves their timers; frames
already on the wire keep their arrival time. Nothing is polled, so timer rounding can make
a delivery slightly late in real time but never costs credit or throughput.

The link also keeps what a sender can observe about its own transfers (bytes, send
durations, delivery delays) for measured telemetry. It does not know what the bytes mean.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..common.units import KIB, mbps_to_bytes
from .bucket import Sent, TokenBucket


@dataclass(frozen=True)
class Transfer:
    """What the sender observed of one delivered frame."""

    size: int
    enqueued: float
    start: float  # reached the head of the queue
    finish: float  # last byte left
    arrival: float  # when the delivery ran (timer lateness included)
    streamed: float  # bytes not covered by burst credit
    scheduled: float = math.nan  # when it was due: finish + latency (FIFO-adjusted)

    @property
    def tx_time(self) -> float:
        return self.finish - self.start


MEASURED_DIGITS = 9  # significant digits a link's measurement keeps


def measured(x: float) -> float:
    """A measurement of the link (a rate, a latency) to MEASURED_DIGITS significant digits.
    It is computed from differences of loop times, whose rounding depends on the clock's
    absolute values (the virtual clock counts from 0, the real one from the host's
    monotonic clock): the digits beyond are float noise, and a decision that compares two
    measurements must not hinge on them (a real-clock run would then break a tie
    differently from its virtual twin)."""
    return float(f"{x:.{MEASURED_DIGITS}g}") if math.isfinite(x) else x


class EmulatedLink:
    HISTORY = 64  # transfers kept for measurement (bounded)
    CHANGE_FACTOR = 2.0
    # a control frame delivered later than this share of its time on the link after it was
    # due is late: the host more than doubled what the emulated link took
    LATE_SHARE = 1.0

    MSS = 1448  # TCP payload bytes a segment on an Ethernet MTU of 1500 (with timestamps)

    def __init__(self, src: str, dst: str, bandwidth_mbps: float, latency_ms: float,
                 burst_kib: float = 0.0, loop: asyncio.AbstractEventLoop | None = None,
                 header_bytes: int = 0) -> None:
        self.src, self.dst = src, dst
        # bytes the wire adds to every MSS bytes of a frame (the kernel's TCP over Ethernet:
        # 66, see tools/bench/kernel.py), in proportion: TCP packs a backlogged stream into
        # full segments whatever its frames; 0: the frame's own bytes only
        self.header_bytes = header_bytes
        self.loop = loop or asyncio.get_running_loop()
        self.bandwidth_mbps = float(bandwidth_mbps)
        self.latency = latency_ms / 1e3
        self.bucket = TokenBucket(mbps_to_bytes(self.bandwidth_mbps), burst_kib * KIB, self.loop.time())
        # id -> (frame, callback, enqueued time, timer handle or None)
        self._pending: dict[int, list] = {}
        self._sent: dict[int, Sent] = {}
        self._last_arrival = -math.inf
        self.bytes_sent = 0
        self.frames_sent = 0
        self.delivered = 0  # deliveries run
        # of the frames whose receiver does not re-time them (see `send`): how many were
        # delivered, and how many later than LATE_SHARE of their time on the link
        self.checked = 0
        self.late = 0
        # the sender's alarm: called with the new rate (bytes/s) when a transfer streams at
        # a rate that differs from the last one seen by more than CHANGE_FACTOR either way
        self.on_change: Callable[[float], None] | None = None
        self._seen_rate: float | None = None
        # where the current rate regime began (start of the frame that raised the alarm):
        # measurements average only frames from there on, never across a change
        self._regime_from = -math.inf
        # benchmarks: when set, every delivered transfer is appended here (unbounded)
        self.record: list[Transfer] | None = None
        self.due = math.nan  # during a delivery callback: when the frame was due
        # bytes charged beyond every frame's own: a transport's framing that the frames
        # handed to this link do not carry (the virtual twin of a run over websockets)
        self.frame_extra = 0
        self.history: deque[Transfer] = deque(maxlen=self.HISTORY)

    @property
    def latency_ms(self) -> float:
        return self.latency * 1e3

    def due_by(self, t: float) -> bool:
        """Whether a frame due by loop time `t` has not been delivered yet (its timer has
        not run). Arrivals never decrease along the queue: the first frame tells."""
        for entry in self._pending.values():
            return entry[3] is not None and entry[3].when() <= t
        return False

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def down(self) -> bool:
        """Rate 0: frames wait (none is lost) until a rate is set again."""
        return self.bucket.rate <= 0

    def send(self, frame: bytes, deliver: Callable[[bytes], None], at: float | None = None,
             retimed: bool = False) -> None:
        """Queue frame; `deliver(frame)` runs when it is due (`self.due` tells when that
        was, during the call). `at`: the emulated time the sender handed it over (the end
        of the job that produced it), if earlier than now: the host's own delay between
        the two is not the link's. `retimed`: the receiver acts on the frame as of its due
        time (data frames), so a late delivery does not delay the emulated system and is
        not counted as late."""
        now = self.loop.time() if at is None else min(at, self.loop.time())
        size = len(frame) + self.frame_extra
        mid, done = self.bucket.enqueue(now, self.wire_bytes(size))
        # before recording: it may be done; the host's own time of the hand-over last (lateness)
        self._pending[mid] = [frame, deliver, now, None, retimed, self.loop.time()]
        self._record_sent(done)
        self.bytes_sent += size
        self.frames_sent += 1
        # a frame covered by burst credit (or empty) has already left: it is not queued
        finish = next((s.finish for s in done if s.id == mid), None)
        if finish is None:
            finish = self.bucket.projection()[-1][1]
        self._schedule(mid, finish)

    def wire_bytes(self, size: int) -> int:
        """The bytes a frame of `size` takes on the link (its share of headers included)."""
        return size + round(self.header_bytes * size / self.MSS)

    def set(self, bandwidth_mbps: float | None = None, latency_ms: float | None = None,
            burst_kib: float | None = None, at: float | None = None) -> None:
        """Apply a rate/latency/burst change from now on (scenario `set_link`), or from `at`
        if that is earlier (a token's start, which the host reaches a little later on the
        real clock; the bucket never goes back before what it has already sent)."""
        now = self.loop.time() if at is None else min(at, self.loop.time())
        was_down = self.down
        rate = None if bandwidth_mbps is None else mbps_to_bytes(bandwidth_mbps)
        burst = None if burst_kib is None else burst_kib * KIB
        self._record_sent(self.bucket.set_rate(now, rate, burst))
        if bandwidth_mbps is not None:
            self.bandwidth_mbps = float(bandwidth_mbps)
        if latency_ms is not None:
            self.latency = latency_ms / 1e3
        # frames still being sent get new departure times (and the new latency)
        for mid, _ in self.bucket.projection():
            entry = self._pending.get(mid)
            if entry is not None and entry[3] is not None:
                entry[3].cancel()
                entry[3] = None
        # FIFO order is kept against the frames already on the wire
        self._last_arrival = max((e[3].when() for e in self._pending.values() if e[3] is not None),
                                 default=-math.inf)
        for mid, finish in self.bucket.projection():
            if mid in self._pending:
                self._schedule(mid, finish)
        # the sender sees its queue stop draining (or start again) at once
        if self.on_change is not None and self.down != was_down:
            self.on_change(self.bucket.rate)

    def drop_all(self) -> int:
        """The sender died: every frame not yet delivered is lost. Returns how many."""
        n = len(self._pending)
        for entry in self._pending.values():
            if entry[3] is not None:
                entry[3].cancel()
        self._pending.clear()
        self._sent.clear()
        return n

    def _schedule(self, mid: int, finish: float) -> None:
        if math.isinf(finish):
            return  # held by a link that is down; rescheduled when a rate is set
        arrival = max(finish + self.latency, self._last_arrival)
        self._last_arrival = arrival
        self._pending[mid][3] = self.loop.call_at(arrival, self._deliver, mid)

    def _record_sent(self, done: list[Sent]) -> None:
        for s in done:
            if s.id in self._pending:
                self._sent[s.id] = s
        if len(self._sent) > 4 * self.HISTORY:  # bounded: drop records nobody will collect
            for k in list(self._sent)[: len(self._sent) - self.HISTORY]:
                del self._sent[k]

    def _deliver(self, mid: int) -> None:
        # advance first: a frame's own finish may only be seen now, and it is recorded only
        # while it is still pending. Only as far as its last byte's departure (its arrival
        # less the latency), not to the loop's time: on the real clock a delivery the host
        # runs late would otherwise move the bucket past instants a sender may still hand
        # frames over as of (the end of a job, a token's start), and delay them
        entry = self._pending.get(mid)
        sent_by = entry[3].when() - self.latency if entry is not None and entry[3] is not None else math.inf
        self._record_sent(self.bucket.advance(min(self.loop.time(), sent_by)))
        # Timers due at the same instant do not fire in scheduling order (asyncio's timer
        # heap is not stable), and FIFO often makes arrivals equal (a frame held behind one
        # still on the wire). Arrivals never decrease along the queue, so every frame sent
        # before `mid` is due too: deliver those first, in order. `_pending` is in send order.
        due = []
        now = self.loop.time()
        while self._pending:
            first = next(iter(self._pending))
            frame, deliver, enqueued, handle, retimed, handed = self._pending.pop(first)
            if first != mid and handle is not None:
                handle.cancel()
            due.append((first, frame, deliver, enqueued, handle.when() if handle is not None else now, retimed,
                        handed))
            if first == mid:
                break
        for i, frame, deliver, enqueued, when, retimed, handed in due:
            self.delivered += 1
            if not retimed:
                self.checked += 1
                # late from when it was due or, if the sender handed it over only after that
                # (as of an earlier emulated instant: its receiver acts as of the due time), from
                # the hand-over: the delivery's own delay, not the sender's
                if now - max(when, handed) > self.LATE_SHARE * (when - enqueued):
                    self.late += 1
            s = self._sent.pop(i, None)
            if s is not None:
                t = Transfer(len(frame), enqueued, s.start, s.finish, now, s.streamed, when)
                self.history.append(t)
                if self.record is not None:
                    self.record.append(t)
                self._watch(t)
            try:
                self.due = when
                deliver(frame)
            except Exception as exc:  # as a timer callback would: report, deliver the rest
                self.loop.call_exception_handler({
                    "message": f"link {self.src}->{self.dst}: delivery callback failed",
                    "exception": exc})

    # ---------------------------------------------------------------- observations

    def _watch(self, t: Transfer) -> None:
        if t.tx_time <= 0 or t.streamed <= 0:
            return
        rate = measured(t.streamed / t.tx_time)
        seen, self._seen_rate = self._seen_rate, rate
        if seen is not None and not (seen / self.CHANGE_FACTOR < rate < seen * self.CHANGE_FACTOR):
            self._regime_from = t.start
            if self.on_change is not None:
                self.on_change(rate)

    def observed_rate(self, since: float = -math.inf, until: float = math.inf) -> float | None:
        """Bytes/s the sender saw its frames stream at (frames finished after `since` and
        due by `until`, ignoring those covered by burst credit); None without such frames. Frames before
        the last change of rate the sender noticed are left out: an average across a drop
        is neither rate, and which frames it mixes depends on timing (in real time, on the
        host), so a decision built on it would too."""
        streamed = tx = 0.0
        for t in self.history:
            if t.finish > since and t.scheduled <= until and t.start >= self._regime_from and t.tx_time > 0:
                streamed += t.streamed
                tx += t.tx_time
        return measured(streamed / tx) if tx > 0 else None

    def observed_latency(self, since: float = -math.inf, until: float = math.inf) -> float | None:
        """The smallest delay seen from a frame's last byte to its emulated arrival (the
        propagation latency; a delivery the host ran late does not count against the link),
        of frames finished after `since` and due by `until`."""
        lat = [t.scheduled - t.finish for t in self.history if t.finish > since and t.scheduled <= until]
        return measured(min(lat)) if lat else None
