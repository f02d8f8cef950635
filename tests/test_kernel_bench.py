"""The kernel cross-check (tools/bench/kernel.py): its emulated side on the virtual clock,
its trace handling and throughput figure, the link's header option; and one small pass
through the kernel where the runner may build namespaces (skipped with the reason if not)."""

from __future__ import annotations

import asyncio

import pytest

from testbed.emulation.clock import run as run_loop
from testbed.emulation.link import EmulatedLink
from testbed.harness import kernel
from tools.bench import kernel as bench


def test_header_bytes_make_a_frame_take_its_share_of_segment_headers_on_the_link() -> None:
    async def main() -> tuple[int, int, float]:
        link = EmulatedLink("a", "b", 8.0, 0.0, header_bytes=66)  # 1 MB/s
        done: list[float] = []
        link.send(bytes(1448 * 10), lambda f: done.append(asyncio.get_running_loop().time()))
        await asyncio.sleep(1.0)
        return link.wire_bytes(1448), EmulatedLink("a", "b", 8.0, 0.0).wire_bytes(1448), done[0]

    one, plain, arrival = run_loop(main, "virtual")
    assert (one, plain) == (1448 + 66, 1448)
    assert arrival == pytest.approx(10 * (1448 + 66) / 1e6)


def test_the_emulated_side_streams_at_the_rate_beyond_its_burst() -> None:
    frames = [(0.0, 1082)] * 500
    for header in (0, 66):
        arr = bench.emulated(frames, 10.0, 1514, header)
        wire = (1082 + 4) * (1 + header / 1448)
        assert bench.throughput(frames, arr, 1514) == pytest.approx(10.0 * 1082 / wire, rel=0.01)
        assert arr == sorted(arr)


def test_paced_frames_on_an_idle_link_arrive_one_transmission_after_they_leave() -> None:
    arr = bench.emulated([(0.0, 996), (1.0, 996)], 8.0, 1514, 0)  # 1000 B at 1 MB/s: 1 ms
    assert arr == pytest.approx([0.0, 1.0])  # within the burst: at once
    arr = bench.emulated([(0.0, 2996), (1.0, 2996)], 8.0, 1514, 0)
    assert arr == pytest.approx([(3000 - 1514) / 1e6, 1.0 + (3000 - 1514) / 1e6])


def test_cut_repeats_the_trace_up_to_the_byte_and_time_budget() -> None:
    trace = [(5.0, 1000), (5.5, 1000)]
    out = bench.cut(trace, 8.0, 1.0)  # 1e6 bytes a second: time runs out first
    assert out[:4] == [(0.0, 1000), (0.5, 1000), (0.5, 1000), (1.0, 1000)]
    assert all(at <= 1.0 for at, _ in out)
    assert bench.cut(trace, 0.008, 1.0) == [(0.0, 1000)]  # 1000 bytes: one frame


WHY = kernel.refusal()


@pytest.mark.skipif(WHY is not None, reason=WHY or "")
def test_one_rate_through_the_kernel_leaves_nothing_and_lands_near_its_rate() -> None:
    before = kernel.ours()
    trace = [(i * 0.002, 1082) for i in range(200)]
    row = bench.measure(trace, 10.0, 65536, 1.0)
    assert kernel.ours() == before
    assert row.frames > 10 and row.retrans >= 0
    # the kernel's goodput sits below the rate by about its header share, never above it
    assert 0.85 * 10.0 < row.kernel_mbps < 10.0
