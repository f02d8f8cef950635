"""The emulated link (testbed/emulation/link.py) in virtual time: arrival times against the
analytic formula, pipelining, FIFO order across latency changes, live rate changes, a link
that goes down and comes back, burst credit, and the sender-side observations."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.emulation.clock import run, sleep_until
from testbed.emulation.link import EmulatedLink

TOL = 1e-6  # seconds


def tx(size: float, bw_mbps: float) -> float:
    return 8 * size / (bw_mbps * 1e6)


class Receiver:
    """Collects (loop time, frame) of every delivery."""

    def __init__(self) -> None:
        self.got: list[tuple[float, bytes]] = []

    def __call__(self, frame: bytes) -> None:
        self.got.append((asyncio.get_running_loop().time(), frame))

    @property
    def frames(self) -> list[bytes]:
        return [f for _, f in self.got]

    def at(self, frame: bytes) -> float:
        [t] = [t for t, f in self.got if f == frame]
        return t


def frame(i: int, size: int) -> bytes:
    """A frame of `size` bytes that says which one it is (size >= 4)."""
    return i.to_bytes(4, "big") + bytes(size - 4)


async def drain(link: EmulatedLink, limit: float = 1e6) -> None:
    """Wait (in virtual time) until every frame sent has been delivered."""
    loop = asyncio.get_running_loop()
    end, step = loop.time() + limit, 0.01
    while link.in_flight and loop.time() < end:
        await asyncio.sleep(step)  # deliveries are timers of their own: polling is harmless
        step = min(2 * step, 10.0)
    assert link.in_flight == 0


def one_transfer(size: int, bw: float, lat: float, start: float = 0.0) -> float:
    async def main() -> float:
        await sleep_until(start)
        link = EmulatedLink("a", "b", bw, lat)
        rx = Receiver()
        t0 = asyncio.get_running_loop().time()
        link.send(bytes(size), rx)
        await drain(link)
        [(t, _)] = rx.got
        return t - t0

    return run(main, "virtual")


# ------------------------------------------------------------------ idle link


@pytest.mark.parametrize(
    "size,bw,lat",
    [(1, 1.0, 0.0), (1500, 1.0, 5.0), (1500, 100.0, 2.0), (65536, 1000.0, 0.5),
     (10**6, 10.0, 50.0), (12345, 0.128, 250.0), (8, 1e4, 0.01)],
)
def test_idle_link_arrival_is_exact(size, bw, lat):
    assert one_transfer(size, bw, lat) == pytest.approx(tx(size, bw) + lat / 1e3, abs=TOL)
    # ... also far from time 0, where the floats are coarser
    assert one_transfer(size, bw, lat, start=86_400.0) == pytest.approx(
        tx(size, bw) + lat / 1e3, abs=TOL)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(0, 10**6), bw=st.floats(0.1, 1e4), lat=st.floats(0.0, 500.0))
def test_idle_link_arrival_is_exact_property(size, bw, lat):
    assert one_transfer(size, bw, lat) == pytest.approx(tx(size, bw) + lat / 1e3, abs=TOL)


def test_pipelining_second_message_does_not_wait_for_latency():
    async def main():
        link = EmulatedLink("a", "b", 8.0, 50.0)  # 1 MB/s: 1000 B take 1 ms
        rx = Receiver()
        a, b = frame(0, 1000), frame(1, 1000)
        link.send(a, rx)
        link.send(b, rx)
        assert link.in_flight == 2
        await drain(link)
        assert rx.frames == [a, b]
        assert rx.at(a) == pytest.approx(0.051, abs=TOL)
        assert rx.at(b) == pytest.approx(0.052, abs=TOL)  # not 0.102

    run(main, "virtual")


def test_fifo_when_latency_drops_while_a_frame_is_on_the_wire():
    async def main():
        link = EmulatedLink("a", "b", 8.0, 100.0)
        rx = Receiver()
        a, b, c = frame(0, 10_000), frame(1, 1000), frame(2, 1000)
        link.send(a, rx)  # leaves at 0.010, on the wire until 0.110
        await sleep_until(0.02)
        link.set(latency_ms=1.0)
        link.send(b, rx)  # would arrive at 0.022: held behind `a`
        await sleep_until(0.2)
        link.send(c, rx)  # nothing in front any more: 0.2 + 0.001 + 0.001
        await drain(link)
        assert rx.frames == [a, b, c]
        assert rx.at(a) == pytest.approx(0.110, abs=TOL)
        assert rx.at(b) == pytest.approx(0.110, abs=TOL)
        assert rx.at(c) == pytest.approx(0.202, abs=TOL)

    run(main, "virtual")


def test_fifo_when_latency_drops_with_frames_queued():
    async def main():
        link = EmulatedLink("a", "b", 8.0, 100.0)  # 1 MB/s
        rx = Receiver()
        frames = [frame(i, 5000) for i in range(6)]  # 5 ms each
        for f in frames:
            link.send(f, rx)
        await sleep_until(0.0125)  # 0, 1 on the wire (arrive 0.105, 0.110); 2 half sent
        link.set(latency_ms=2.0)
        await drain(link)
        assert rx.frames == frames
        times = [rx.at(f) for f in frames]
        assert times == sorted(times)
        # frames 2.. finish at 0.015, 0.020, ... and arrive 2 ms later, but not before 0.110
        expected = [0.105, 0.110] + [max(0.110, 0.005 * (i + 1) + 0.002) for i in range(2, 6)]
        assert times == pytest.approx(expected, abs=TOL)

    run(main, "virtual")


# ------------------------------------------------------------------ rate changes


def test_rate_change_mid_transfer():
    async def main():
        link = EmulatedLink("a", "b", 8.0, 10.0)  # 1e6 B/s
        rx = Receiver()
        a, b = frame(0, 100_000), frame(1, 20_000)
        link.send(a, rx)  # alone: would leave at 0.100
        link.send(b, rx)
        await sleep_until(0.04)  # 40 000 B sent
        link.set(bandwidth_mbps=16.0)  # 60 000 B left at 2e6 B/s: 30 ms
        await drain(link)
        assert rx.frames == [a, b]
        assert rx.at(a) == pytest.approx(0.070 + 0.010, abs=TOL)
        assert rx.at(b) == pytest.approx(0.070 + 0.010 + 0.010, abs=TOL)
        assert link.bandwidth_mbps == 16.0

    run(main, "virtual")


def test_rate_and_latency_change_together():
    async def main():
        link = EmulatedLink("a", "b", 8.0, 10.0)
        rx = Receiver()
        a = frame(0, 100_000)
        link.send(a, rx)
        await sleep_until(0.05)
        link.set(bandwidth_mbps=4.0, latency_ms=30.0)  # 50 000 B at 5e5 B/s: 0.1 s
        await drain(link)
        assert rx.at(a) == pytest.approx(0.15 + 0.03, abs=TOL)

    run(main, "virtual")


def test_link_down_holds_frames_and_coming_back_delivers_all():
    async def main():
        link = EmulatedLink("a", "b", 8.0, 10.0)  # 1e6 B/s; 10 000 B take 10 ms
        rx = Receiver()
        frames = [frame(i, 10_000) for i in range(5)]
        for f in frames:
            link.send(f, rx)
        await sleep_until(0.025)  # 0 delivered, 1 on the wire, 2 half sent
        link.set(bandwidth_mbps=0)
        late = frame(5, 1000)
        link.send(late, rx)  # queued while down
        await sleep_until(5.0)
        assert rx.frames == frames[:2]  # the frame on the wire still arrives
        assert rx.at(frames[1]) == pytest.approx(0.030, abs=TOL)
        assert link.in_flight == 4
        link.set(bandwidth_mbps=16.0)  # 2e6 B/s: 5000 B left of frame 2
        await drain(link)
        assert rx.frames == frames + [late]  # none lost, none duplicated, FIFO
        t = [rx.at(f) for f in frames[2:]] + [rx.at(late)]
        expected = [5.0025, 5.0075, 5.0125, 5.013]
        assert t == pytest.approx([e + 0.010 for e in expected], abs=TOL)
        assert link.frames_sent == 6 and link.bytes_sent == 51_000

    run(main, "virtual")


def test_link_down_then_latency_change_then_up():
    async def main():
        link = EmulatedLink("a", "b", 8.0, 10.0)
        rx = Receiver()
        a = frame(0, 10_000)
        link.send(a, rx)
        link.set(bandwidth_mbps=0)
        await sleep_until(1.0)
        link.set(latency_ms=20.0)  # still down: nothing scheduled
        await sleep_until(2.0)
        assert rx.got == []
        link.set(bandwidth_mbps=8.0)
        await drain(link)
        assert rx.at(a) == pytest.approx(2.0 + 0.010 + 0.020, abs=TOL)

    run(main, "virtual")


# ------------------------------------------------------------------ burst credit


def test_burst_credit_small_message_arrives_after_just_the_latency():
    async def main():
        link = EmulatedLink("a", "b", 8.0, 5.0, burst_kib=16)  # 16 384 B of credit
        rx = Receiver()
        a, b = frame(0, 1000), frame(1, 20_384)
        link.send(a, rx)  # all credit
        link.send(b, rx)  # 15 384 B of credit, 5000 B streamed at 1e6 B/s
        await drain(link)
        assert rx.at(a) == pytest.approx(0.005, abs=TOL)
        assert rx.at(b) == pytest.approx(0.005 + 0.005, abs=TOL)
        await sleep_until(10.0)  # refilled
        c = frame(2, 16_384)
        link.send(c, rx)
        await drain(link)
        assert rx.at(c) == pytest.approx(10.005, abs=TOL)
        assert link.history[-1].streamed == 0

    run(main, "virtual")


def test_empty_frame_arrives_after_the_latency():
    async def main():
        link = EmulatedLink("a", "b", 1.0, 7.0)
        rx = Receiver()
        link.send(b"", rx)
        await drain(link)
        assert rx.got == [(pytest.approx(0.007, abs=TOL), b"")]

    run(main, "virtual")


# ------------------------------------------------------------------ observations


@pytest.mark.parametrize("back_to_back", [False, True])
def test_observed_rate_and_latency_match_the_configuration(back_to_back):
    async def main():
        link = EmulatedLink("a", "b", 24.0, 3.0)  # 3e6 B/s
        rx = Receiver()
        for i, size in enumerate([1500, 9000, 64_000, 300]):
            link.send(frame(i, size), rx)
            if not back_to_back:
                await drain(link)
        await drain(link)
        assert len(link.history) == 4
        assert link.observed_rate() == pytest.approx(3e6, rel=1e-9)
        assert link.observed_latency() == pytest.approx(0.003, abs=TOL)
        link.set(bandwidth_mbps=8.0)
        since = asyncio.get_running_loop().time()
        link.send(frame(9, 5000), rx)
        await drain(link)
        assert link.observed_rate(since) == pytest.approx(1e6, rel=1e-9)

    run(main, "virtual")


def test_observed_rate_does_not_average_across_a_noticed_change():
    """Frames before and after a drop the sender noticed are never mixed into one rate
    (an average of 50 and 5 Mbit/s would be neither, and would depend on timing)."""
    async def main():
        link = EmulatedLink("a", "b", 40.0, 1.0)  # 5e6 B/s
        alarms = []
        link.on_change = alarms.append
        rx = Receiver()
        since = asyncio.get_running_loop().time()
        for i in range(4):
            link.send(frame(i, 20_000), rx)
        await drain(link)
        link.set(bandwidth_mbps=4.0)  # 5e5 B/s: a tenth
        for i in range(4, 6):
            link.send(frame(i, 20_000), rx)
        await drain(link)
        assert alarms == [pytest.approx(5e5, rel=1e-9)]
        assert link.observed_rate(since) == pytest.approx(5e5, rel=1e-9)
        # a change below the alarm's factor is averaged as before
        link.set(bandwidth_mbps=6.0)
        link.send(frame(6, 20_000), rx)
        await drain(link)
        mixed = link.observed_rate(since)
        assert 5e5 < mixed < 7.5e5

    run(main, "virtual")


# ------------------------------------------------------------------ property


@settings(max_examples=30, deadline=None)
@given(ops=st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(4, 50_000)),
        st.tuples(st.just("bw"), st.sampled_from([0.0, 0.0, 0.5, 8.0, 100.0])),
        st.tuples(st.just("lat"), st.sampled_from([0.0, 1.0, 20.0, 200.0])),
        st.tuples(st.just("wait"), st.floats(0.0, 0.2)),
    ),
    max_size=30,
))
def test_random_changes_lose_nothing_and_keep_fifo(ops):
    async def main():
        loop = asyncio.get_running_loop()
        link = EmulatedLink("a", "b", 8.0, 10.0)
        rx = Receiver()
        sent = []
        for kind, x in ops:
            if kind == "send":
                sent.append(frame(len(sent), x))
                link.send(sent[-1], rx)
            elif kind == "bw":
                link.set(bandwidth_mbps=x)
            elif kind == "lat":
                link.set(latency_ms=x)
            else:
                await asyncio.sleep(x)
        link.set(bandwidth_mbps=1.0)
        await drain(link)
        assert rx.frames == sent
        times = [t for t, _ in rx.got]
        assert times == sorted(times)
        assert all(t <= loop.time() for t in times)

    run(main, "virtual")


# ------------------------------------------------------------------ late deliveries


def test_a_frame_handed_over_as_of_an_earlier_instant_is_not_late_when_delivered_at_once():
    """A control frame sent as of an earlier emulated instant (`at`: its receiver acts as of
    its due time) and delivered as soon as it is handed over is not late: the sender's
    delay is not the link's. The same frame without `at` is due later and on time too."""
    async def main():
        link = EmulatedLink("a", "b", 100.0, 1.0)
        rx = Receiver()
        await asyncio.sleep(0.05)
        link.send(b"x" * 100, rx, at=0.0)  # due at about 0.001, handed over at 0.05
        await drain(link)
        assert rx.at(b"x" * 100) == pytest.approx(0.05, abs=TOL)
        assert (link.checked, link.late) == (1, 0)

    run(main, "virtual")


def test_a_delivery_the_host_runs_late_is_counted_late():
    """Real clock: the loop is blocked past a frame's due time by more than its time on the
    link (1 ms due, 30 ms blocked): counted late; a data frame (`retimed`) is not checked."""
    async def main():
        import time as wall

        link = EmulatedLink("a", "b", 100.0, 1.0)
        rx = Receiver()
        link.send(b"c", rx)
        link.send(b"d", rx, retimed=True)
        wall.sleep(0.03)  # the host busy elsewhere: the timers fire late
        await drain(link)
        assert rx.frames == [b"c", b"d"]
        assert (link.checked, link.late) == (1, 1)

    run(main, "real")
