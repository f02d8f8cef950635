"""The planner's load window: mean compute and least room over the last N tokens, the
latest observation of a token counting, devices that come and go."""

from __future__ import annotations

import pytest

from testbed.placement.problem import DeviceState
from testbed.placement.window import LoadWindow


def dev(name: str, flops: float, cap: int, hard: int | None = None, alive: bool = True) -> DeviceState:
    return DeviceState(name, flops, cap, True, alive, cap + 100 if hard is None else hard)


def test_one_token_is_the_latest_observation_unchanged() -> None:
    w = LoadWindow(1)
    w.observe(0, [dev("a", 10.0, 500)])
    now = (dev("a", 4.0, 100), dev("b", 1.0, 7))
    assert w.observe(1, now) == now


def test_mean_compute_and_least_room_over_the_window() -> None:
    w = LoadWindow(3)
    for k, (f, c) in enumerate([(100.0, 50), (10.0, 900), (20.0, 800), (30.0, 700)]):
        view = w.observe(k, [dev("a", f, c)])
    (a,) = view
    # tokens 1..3 (token 0 fell out): compute 10, 20, 30; room 900, 800, 700
    assert a.flops == pytest.approx(20.0) and a.capacity == 700 and a.hard_capacity == 800


def test_a_token_seen_again_counts_its_latest_observation() -> None:
    w = LoadWindow(4)
    w.observe(0, [dev("a", 10.0, 100)])
    w.observe(1, [dev("a", 30.0, 50)])
    (a,) = w.observe(1, [dev("a", 50.0, 300)])  # a decision later in token 1 sees more
    assert a.flops == pytest.approx(30.0) and a.capacity == 100


def test_devices_that_join_leave_or_are_gone() -> None:
    w = LoadWindow(4)
    w.observe(0, [dev("a", 10.0, 100), dev("b", 2.0, 10)])
    w.observe(1, [dev("a", 20.0, 200), dev("b", 4.0, 20, alive=False)])
    a, b, c = w.observe(2, [dev("a", 30.0, 300), dev("b", 6.0, 30, alive=False), dev("c", 8.0, 80)])
    assert a.flops == pytest.approx(20.0) and a.capacity == 100
    assert b == dev("b", 6.0, 30, alive=False)  # gone: as it is
    assert c.flops == 8.0 and c.capacity == 80  # joined: only what was seen of it


def test_a_window_covers_at_least_one_token() -> None:
    with pytest.raises(ValueError):
        LoadWindow(0)
