"""The websocket transport with kernel links (`WsEndpoint.kernel_links`): the emulated link
only keeps the sender's accounts and adds the latency; the bytes are written at once after
it (the kernel shapes them), and the receiver takes the real arrival, not the due time."""

from __future__ import annotations

import asyncio
from typing import Any

from testbed.emulation.clock import run as run_loop
from testbed.scenario.records import LinkSpec
from testbed.transport.ws import WsEndpoint

TOKEN = "k" * 24


async def _pair(kernel_links: bool, link: LinkSpec) -> tuple[WsEndpoint, WsEndpoint, list[tuple[Any, float]]]:
    a, b = WsEndpoint("a", TOKEN), WsEndpoint("b", TOKEN)
    got: list[tuple[Any, float]] = []
    b.handler = lambda sender, msg, arrived: got.append((msg, asyncio.get_running_loop().time()))
    for ep in (a, b):
        ep.kernel_links = kernel_links
    await a.start()
    await b.start()
    a.add_peer("b", b.url, link)
    b.add_peer("a", a.url, link)
    await asyncio.gather(a.connect(), b.connect())
    return a, b, got


def test_kernel_links_write_after_the_latency_and_leave_the_rate_to_the_kernel() -> None:
    async def main() -> tuple[float, float, bool, float]:
        # 0.08 Mbit/s: 10 kB take a second on the emulated link; 50 ms of latency
        a, b, got = await _pair(True, LinkSpec(0.08, 50.0))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        a.send("b", {"t": "x", "pad": b"\0" * 10_000})
        for _ in range(400):
            if got:
                break
            await asyncio.sleep(0.01)
        arrived = got[0][1] - t0
        heartbeat = a._heartbeat() is None
        # the accounts still see the emulated rate (telemetry, alarms)
        await asyncio.sleep(1.2)
        rate = a.links["b"].observed_rate() or 0.0
        await a.close()
        await b.close()
        return arrived, rate, heartbeat, a.links["b"].latency

    arrived, rate, no_heartbeat, latency = run_loop(main, "real")
    assert latency <= arrived < 0.5  # after the latency, long before the emulated second
    assert abs(rate - 10_000) < 1_000  # bytes/s of the emulated link's accounts
    assert no_heartbeat


def test_emulated_links_still_hold_the_frame_for_its_time_on_the_link() -> None:
    async def main() -> float:
        a, b, got = await _pair(False, LinkSpec(0.8, 0.0))  # 10 kB: 0.1 s
        t0 = asyncio.get_running_loop().time()
        a.send("b", {"t": "x", "pad": b"\0" * 10_000})
        for _ in range(400):
            if got:
                break
            await asyncio.sleep(0.01)
        await a.close()
        await b.close()
        return got[0][1] - t0

    assert run_loop(main, "real") >= 0.09
