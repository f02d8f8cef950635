"""Control traffic on the emulated timeline: the controller's instant (agents/timeline.py)
moves to the emulated arrival of what it waited for, not to when the host handed it over,
and what it sends next leaves as of then; a background round does not move it; a device's
link report covers what was due by the request's arrival."""

from __future__ import annotations

import asyncio
import time
from types import MappingProxyType
from typing import Any

import pytest

from testbed.agents import messages as P
from testbed.agents.requests import Requests
from testbed.agents.timeline import Timeline
from testbed.emulation import clock
from testbed.emulation.link import EmulatedLink


class Port:
    """Records what the controller sends, with the emulated time it is handed over."""

    source = "src"

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, float | None]] = []

    def send(self, dst: str, msg: dict[str, Any], at: float | None = None) -> None:
        self.sent.append((dst, msg["t"], at))

    def attach(self, handler: Any) -> None:
        pass

    async def settle(self, t: float) -> None:
        pass


def _ack(rid: int, device: str) -> P.Ack:
    return P.Ack(rid, True, device, MappingProxyType({}))


def _requests(port: Port, lost: list[str]) -> Requests:
    loop = asyncio.get_running_loop()
    return Requests(port, loop, 0.05, lambda d, why: lost.append(d), Timeline(loop))


def test_an_answer_the_host_hands_over_late_counts_from_its_due_time() -> None:
    """The answer is due 2 ms after the request; the host is busy for 30 ms (K = 1) before it
    hands it over. The controller's instant is the due time, and the next request leaves
    as of then; on the loop's own clock it would leave 28 ms later."""

    async def main() -> tuple[float, float, float, list[tuple[str, str, float | None]]]:
        loop = asyncio.get_running_loop()
        port, lost = Port(), []
        req = _requests(port, lost)
        t0 = req.timeline.now()
        fut = req.request("a", lambda rid: P.Cancel(rid, ("head.0.0",)))
        due = t0 + 0.002

        def answer() -> None:
            time.sleep(0.03)  # the host is elsewhere past the due time
            req.answered(_ack(1, "a"), "a", due)
        loop.call_at(due, answer)
        pending, end = await req.wait([fut], 1.0)
        assert not pending
        req.request("a", lambda rid: P.Cancel(rid, ("head.0.0",)))
        return due, end, loop.time(), port.sent

    due, end, now, sent = clock.run(main, "real")
    assert end == due and now > due + 0.025
    assert sent[1][2] == pytest.approx(due, abs=1e-12)  # the next request: as of the due time


def test_a_background_round_does_not_move_the_controllers_instant_and_a_timeout_does() -> None:
    async def main() -> tuple[float, float, float, float, list[str]]:
        loop = asyncio.get_running_loop()
        port, lost = Port(), []
        req = _requests(port, lost)
        t0 = req.timeline.now()
        fut = req.request("a", lambda rid: P.Cancel(rid, ("head.0.0",)))
        loop.call_at(t0 + 0.01, lambda: req.answered(_ack(1, "a"), "a", t0 + 0.01))
        _, end = await req.wait([fut], 1.0, move=False)
        after_round = req.timeline.now()
        await req.ask({"b": lambda rid: P.Cancel(rid, ("head.0.0",))}, "cancel")  # b never answers
        return t0, end, after_round, req.timeline.now(), lost

    t0, end, after_round, after_timeout, lost = clock.run(main, "virtual")
    assert end == pytest.approx(t0 + 0.01) and lost == ["b"]
    # (on the virtual clock the instant is the loop's own; the round's end is reported, not taken)
    assert after_timeout == pytest.approx(after_round + 0.05)


def test_a_background_round_on_the_real_clock_leaves_the_instant_where_it_was() -> None:
    async def main() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        port, lost = Port(), []
        req = _requests(port, lost)
        t0 = req.timeline.now()
        fut = req.request("a", lambda rid: P.Cancel(rid, ("head.0.0",)))
        loop.call_at(t0 + 0.01, lambda: req.answered(_ack(1, "a"), "a", t0 + 0.01))
        _, end = await req.wait([fut], 1.0, move=False)
        return t0, end, req.timeline.now()

    t0, end, now = clock.run(main, "real")
    assert end == pytest.approx(t0 + 0.01, abs=1e-12) and now == t0


def test_a_link_report_covers_what_was_due_by_the_requests_arrival() -> None:
    """Two frames, due 2 ms and 4 ms after they are sent: a report as of 3 ms counts only the
    first, whatever the host has delivered since."""

    async def main() -> tuple[float | None, float | None, float | None, float | None]:
        loop = asyncio.get_running_loop()
        link = EmulatedLink("a", "b", bandwidth_mbps=8.0, latency_ms=1.0)  # 1 kB: 1 ms + 1 ms
        t0 = loop.time()
        done = asyncio.Event()
        link.send(bytes(1000), lambda f: None)
        link.send(bytes(1000), lambda f: done.set())
        await done.wait()
        return (link.observed_rate(-1.0, t0 + 0.003), link.observed_rate(-1.0, t0 + 0.0015),
                link.observed_latency(-1.0, t0 + 0.0015), link.observed_latency(-1.0))

    rate_by_3ms, rate_by_1ms, lat_by_1ms, lat_all = clock.run(main, "virtual")
    assert rate_by_3ms == pytest.approx(1e6)  # 8 Mbit/s
    assert rate_by_1ms is None and lat_by_1ms is None  # nothing was due by 1.5 ms
    assert lat_all == pytest.approx(0.001)


def test_reports_take_effect_in_due_order_once_the_controllers_instant_reaches_them() -> None:
    """Real clock: the host hands the controller two link alarms, the later one first. The
    one due after the controller's instant waits (no signal, beliefs as they were); once
    the instant passes both, they apply in due order, so the later one's rate stands."""
    import torch

    from testbed.agents.controller import Controller, Options
    from testbed.placement.resource_aware import ResourceAware

    from .test_protocol import PEER, SCEN, SRC, S, _Port, _Recorder

    async def main() -> tuple[str | None, float, str | None, float]:
        class Hooks:
            async def on_epoch(self, k: int) -> None:
                pass

        async def oracle(*a: Any) -> Any:
            raise AssertionError("not asked")

        ctl = Controller(SCEN, S, ResourceAware(), _Port(), ([], torch.zeros(0, S.vocab)), [1, 2], _Recorder(),
                         Hooks(), Options(interval=4, telemetry="measured"), oracle)
        t = ctl.timeline.now()
        i, j = ctl.beliefs.index(PEER), ctl.beliefs.index(SRC)
        before = float(ctl.beliefs.rate[i, j])
        await asyncio.sleep(0.02)  # the host is 20 ms past the controller's instant
        ctl._on_message(PEER, P.LinkChange(PEER, SRC, 2e5, None, t + 0.010).wire(), t + 0.010)
        ctl._on_message(PEER, P.LinkChange(PEER, SRC, 1e5, None, t + 0.005).wire(), t + 0.005)
        early = (ctl._urgent, float(ctl.beliefs.rate[i, j]))
        assert early[1] == before
        ctl.timeline.reach(t + 0.011)
        ctl._take_reports()
        return early[0], early[1], ctl._urgent, float(ctl.beliefs.rate[i, j])

    urgent0, rate0, urgent1, rate1 = clock.run(main, "real")
    assert urgent0 is None and rate0 != 2e5
    assert urgent1 == f"link_change@{PEER}->{SRC}" and rate1 == 2e5  # the later alarm, applied last
