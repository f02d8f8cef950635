"""The analytic token bucket (testbed/emulation/bucket.py): plain synchronous tests of the
pure arithmetic (times in, times out), plus hypothesis properties for conservation, FIFO
order, exact throughput and token-bucket conformance."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.emulation.bucket import Sent, TokenBucket


def finishes(sent: list[Sent]) -> dict[int, float]:
    return {s.id: s.finish for s in sent}


# ------------------------------------------------------------------ examples


@pytest.mark.parametrize("t0", [0.0, 3.25, 12345.678])
@pytest.mark.parametrize("size,rate", [(1, 1.0), (1500, 125_000.0), (65536, 1.25e8), (10**6, 3.0)])
def test_idle_link_finishes_after_size_over_rate(t0, size, rate):
    b = TokenBucket(rate, now=t0)
    mid, done = b.enqueue(t0, size)
    assert done == []
    assert b.projection() == [(mid, t0 + size / rate)]
    assert b.advance(t0 + size / rate * 0.5) == []
    [s] = b.advance(t0 + size / rate)
    assert (s.id, s.size, s.start, s.finish, s.credit_used) == (mid, size, t0, t0 + size / rate, 0.0)
    assert b.queued == 0


def test_idle_link_after_a_quiet_period():
    b = TokenBucket(1000.0)
    b.advance(50.0)
    mid, _ = b.enqueue(100.0, 500)
    assert b.projection() == [(mid, 100.5)]


def test_fifo_back_to_back():
    b = TokenBucket(1000.0)
    ids = [b.enqueue(0.0, size)[0] for size in (1000, 500, 2500)]
    assert b.projection() == [(ids[0], 1.0), (ids[1], 1.5), (ids[2], 4.0)]
    done = b.advance(1.2)
    assert [s.id for s in done] == [ids[0]]
    done += b.advance(100.0)
    assert [s.id for s in done] == ids
    assert [(s.start, s.finish) for s in done] == [(0.0, 1.0), (1.0, 1.5), (1.5, 4.0)]


def test_message_queued_behind_a_busy_link_starts_when_it_is_free():
    b = TokenBucket(1000.0)
    a, _ = b.enqueue(0.0, 2000)
    c, _ = b.enqueue(0.7, 300)  # link busy until 2.0
    assert b.projection() == [(a, 2.0), (c, 2.3)]
    done = b.advance(10.0)
    assert [(s.id, s.start, s.finish) for s in done] == [(a, 0.0, 2.0), (c, 2.0, 2.3)]


def test_full_bucket_sends_burst_at_once_and_streams_the_rest():
    b = TokenBucket(1000.0, burst=5000.0)
    assert b.credit(0.0) == 5000.0  # a fresh link starts with a full bucket
    mid, done = b.enqueue(0.0, 8000)
    assert done == []
    assert b.projection() == [(mid, 3.0)]  # (8000 - 5000) / 1000
    [s] = b.advance(3.0)
    assert (s.credit_used, s.streamed, s.finish) == (5000.0, 3000.0, 3.0)


def test_small_message_within_credit_leaves_at_once():
    b = TokenBucket(1000.0, burst=5000.0)
    mid, done = b.enqueue(1.0, 1200)
    assert [(s.id, s.start, s.finish, s.credit_used) for s in done] == [(mid, 1.0, 1.0, 1200.0)]
    assert b.queued == 0
    assert b.credit(1.0) == 3800.0
    mid2, done2 = b.enqueue(1.0, 4000)  # 3800 of credit left: 200 bytes stream
    assert done2 == [] and b.projection() == [(mid2, 1.2)]


def test_credit_refills_only_while_idle_and_is_capped_at_burst():
    b = TokenBucket(1000.0, burst=5000.0)
    a, _ = b.enqueue(0.0, 10_000)  # 5000 from credit, 5000 streamed: busy until 5.0
    c, _ = b.enqueue(1.0, 1000)  # waits; no credit is earned while the link is busy
    assert b.projection() == [(a, 5.0), (c, 6.0)]
    done = b.advance(6.0)
    assert [(s.id, s.credit_used) for s in done] == [(a, 5000.0), (c, 0.0)]
    assert b.credit(6.0) == 0.0
    assert b.credit(8.0) == 2000.0  # refills at `rate` once idle
    assert b.credit(100.0) == 5000.0  # capped
    b.advance(8.0)
    d, done = b.enqueue(8.0, 3000)  # 2000 of credit, 1000 streamed
    assert done == [] and b.projection() == [(d, 9.0)]
    b.advance(1000.0)
    assert b.credit(1000.0) == 5000.0


def test_rate_change_mid_message_keeps_the_bytes_already_sent():
    b = TokenBucket(1000.0)
    a, _ = b.enqueue(0.0, 10_000)
    c, _ = b.enqueue(0.0, 2000)
    assert b.set_rate(4.0, 2000.0) == []  # 4000 sent; 6000 left at 2000 B/s
    assert b.projection() == [(a, 7.0), (c, 8.0)]
    b.set_rate(5.0, 500.0)  # 4000 left at 500 B/s
    assert b.projection() == [(a, 13.0), (c, 17.0)]
    done = b.advance(20.0)
    assert [(s.id, s.start, s.finish) for s in done] == [(a, 0.0, 13.0), (c, 13.0, 17.0)]


def test_rate_change_while_idle_refills_at_the_old_rate_until_the_change():
    b = TokenBucket(1000.0, burst=10_000.0)
    b.enqueue(0.0, 10_000)  # empties the bucket at once
    b.set_rate(2.0, 3000.0)  # 2000 earned at the old rate
    assert b.credit(2.0) == 2000.0
    assert b.credit(3.0) == 5000.0


def test_burst_change_caps_the_credit():
    b = TokenBucket(1000.0, burst=10_000.0)
    b.set_rate(1.0, burst=4000.0)
    assert b.credit(1.0) == 4000.0
    b.set_rate(2.0, burst=8000.0)  # a larger bucket does not fill at once
    assert b.credit(2.0) == 4000.0
    assert b.credit(3.0) == 5000.0
    assert b.credit(10.0) == 8000.0


def test_rate_zero_holds_messages_and_a_later_rate_resumes_them():
    b = TokenBucket(1000.0)
    a, _ = b.enqueue(0.0, 3000)
    c, _ = b.enqueue(0.5, 1000)
    assert b.set_rate(2.0, 0.0) == []  # 2000 of `a` sent; 1000 left
    assert b.projection() == [(a, math.inf), (c, math.inf)]
    d, done = b.enqueue(3.0, 500)  # queued while the link is down
    assert done == []
    assert b.advance(1e9) == []
    assert b.projection() == [(a, math.inf), (c, math.inf), (d, math.inf)]
    assert b.set_rate(1e9 + 10, 500.0) == []
    t = 1e9 + 10
    assert b.projection() == [(a, t + 2.0), (c, t + 4.0), (d, t + 5.0)]
    done = b.advance(t + 5.0)
    assert [s.id for s in done] == [a, c, d]
    assert sum(s.size for s in done) == 4500


def test_rate_zero_keeps_and_does_not_earn_credit():
    b = TokenBucket(1000.0, burst=3000.0)
    b.enqueue(0.0, 3000)
    b.set_rate(1.0, 0.0)  # 1000 earned before the link went down
    assert b.credit(100.0) == 1000.0
    b.set_rate(100.0, 1000.0)
    assert b.credit(101.0) == 2000.0


def test_invalid_rates_are_refused():
    with pytest.raises(ValueError):
        TokenBucket(-1.0)
    with pytest.raises(ValueError):
        TokenBucket(1.0, burst=-1.0)
    b = TokenBucket(1.0)
    with pytest.raises(ValueError):
        b.set_rate(0.0, -5.0)
    with pytest.raises(ValueError):
        b.set_rate(0.0, burst=-5.0)


# ------------------------------------------------------------------ properties

sizes = st.integers(min_value=0, max_value=200_000)
rates = st.floats(min_value=1.0, max_value=1e9, allow_nan=False, allow_infinity=False)
gaps = st.floats(min_value=0.0, max_value=2.0, allow_nan=False)
bursts = st.sampled_from([0.0, 1.0, 1500.0, 64 * 1024.0])

ops = st.lists(
    st.one_of(
        st.tuples(st.just("enq"), gaps, sizes),
        st.tuples(st.just("rate"), gaps, st.one_of(st.just(0.0), rates)),
        st.tuples(st.just("advance"), gaps, st.just(0)),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(rate=rates, burst=bursts, ops=ops, final_rate=rates)
def test_conservation_fifo_and_monotone_finishes(rate, burst, ops, final_rate):
    b = TokenBucket(rate, burst)
    t, enq_at, sent = 0.0, {}, []
    for kind, dt, x in ops:
        t += dt
        if kind == "enq":
            mid, done = b.enqueue(t, x)
            enq_at[mid] = (t, x)
        elif kind == "rate":
            done = b.set_rate(t, x)
        else:
            done = b.advance(t)
        assert all(s.finish <= t for s in done)
        sent += done
    # after the last change, the projection is what happens
    t += 1.0
    sent += b.set_rate(t, final_rate)
    projected = dict(b.projection())
    backlog = sum(x for _, x in enq_at.values())
    sent += b.advance(t + backlog / final_rate + 1.0)
    sent += b.advance(t + backlog / final_rate + 1e6)

    assert b.queued == 0
    assert [s.id for s in sent] == sorted(enq_at)  # each exactly once, in FIFO order
    assert [s.size for s in sent] == [enq_at[s.id][1] for s in sent]
    fins = [s.finish for s in sent]
    assert fins == sorted(fins)
    for prev, s in zip([None, *sent], sent, strict=False):
        assert s.start >= enq_at[s.id][0]
        assert s.finish >= s.start
        assert 0.0 <= s.credit_used <= min(s.size, burst)
        if prev is not None:
            assert s.start >= prev.finish
    for s in sent:
        if s.id in projected:
            assert s.finish == pytest.approx(projected[s.id], rel=1e-9, abs=1e-9)


@settings(max_examples=300, deadline=None)
@given(rate=rates, sizes_=st.lists(st.integers(1, 10**7), min_size=1, max_size=50),
       probes=st.lists(st.floats(0.0, 1.0), max_size=10))
def test_back_to_back_throughput_is_exact(rate, sizes_, probes):
    b = TokenBucket(rate)
    for size in sizes_:
        b.enqueue(0.0, size)
    total = sum(sizes_)
    sent = []
    for p in sorted(probes):  # partial advances must not lose or gain anything
        sent += b.advance(p * total / rate)
    sent += b.advance(total / rate * 2 + 1.0)
    assert [s.size for s in sent] == sizes_
    assert sent[-1].finish == pytest.approx(total / rate, rel=1e-9)
    assert sent[0].start == 0.0


def _bytes_sent_by(sent: list[Sent], t: float, *, left: bool = False) -> float:
    """Bytes out by time t (just before t when `left`): credit leaves at a message's start,
    the rest streams uniformly until its finish."""
    out = 0.0
    for s in sent:
        if s.start < t or (s.start == t and not left):
            out += s.credit_used
        if s.finish > s.start:
            out += s.streamed * min(1.0, max(0.0, (t - s.start) / (s.finish - s.start)))
        elif s.start < t or (s.start == t and not left):
            out += s.streamed
    return out


@settings(max_examples=300, deadline=None)
@given(rate=rates, burst=bursts,
       steps=st.lists(st.tuples(gaps, st.booleans(), sizes), min_size=1, max_size=30))
def test_token_bucket_conformance(rate, burst, steps):
    b = TokenBucket(rate, burst)
    sent: list[Sent] = []
    t, n = 0.0, 0
    for gap, enqueue, size in steps:
        t += gap * 50_000 / rate  # gaps of the order of a message's transmission time
        if enqueue:
            sent += b.enqueue(t, size)[1]
            n += 1
        else:  # a probe: partial advances must not change the outcome
            sent += b.advance(t)
    sent += b.advance(t + sum(s for _, e, s in steps if e) / rate + 1.0)
    assert len(sent) == n
    # from t=0 (the bucket starts full) ...
    for t2 in {s.start for s in sent} | {s.finish for s in sent}:
        assert _bytes_sent_by(sent, t2) <= (burst + rate * t2) * (1 + 1e-9) + 1e-6
    # ... and over every interval [t1, t2]: bytes out minus rate*t only drops between
    # the starts of messages, so checking from just before one start to another suffices
    starts = sorted({s.start for s in sent})
    for i, t1 in enumerate(starts):
        before = _bytes_sent_by(sent, t1, left=True)
        for t2 in starts[i:]:
            got = _bytes_sent_by(sent, t2) - before
            assert got <= (burst + rate * (t2 - t1)) * (1 + 1e-9) + 1e-6
