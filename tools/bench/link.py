"""Real-time fidelity benchmark of one `EmulatedLink` (python -m tools.bench.link).

For each configured rate (default 1, 10, 100, 1000 Mbit/s; latency 5 ms; burst 0) a sender
keeps the link backlogged with bulk traffic for about `--seconds` on asyncio's default loop
(`clock.run(main, "real")`), and every delivery is timed with `loop.time()` inside the
deliver callback. Two figures per rate, against targets:

- Throughput: bytes delivered after the first arrival divided by the time from the first
  arrival to the last (receiver side, so the latency cancels out). The target is within 2 %
  of the configured rate.
- Lateness: each frame's actual delivery time minus its analytic arrival, computed here
  independently of the link from the send times: finish_i = max(sent_i, finish_{i-1}) +
  size / rate, arrival_i = finish_i + latency. Mean, p99 and max are reported; the target
  is that no delivery is more than 2 ms late. A delivery earlier than its arrival (beyond
  float noise), a lost, duplicated or reordered frame fails the rate outright.

How lateness arises: the link never polls; it computes each arrival from the bucket state
and sets one `loop.call_at` timer per frame. asyncio then sleeps in `epoll_wait`, whose
timeout is in whole milliseconds and is rounded *up* by the selector, so a timer fires
between 0 and about 1 ms after its deadline (mean ~0.5 ms), plus whatever the loop was busy
with (the sender's top-ups, other deliveries) and the time the woken process waits for a
CPU on a loaded machine. Lateness is not cumulative: the next arrival is computed from the
bucket, not from when the previous timer actually fired, so credit and throughput are never
lost, which is why throughput stays on target even when single deliveries are late.

To tell the link's lateness from the loop's and the machine's, each rate also reports
`loop max`: how late the sender's own `asyncio.sleep(0.001)` wake-ups were (a timer with no
link involved), and `runq ms`: how long this process waited runnable for a CPU during the
rate (Linux /proc/self/schedstat; blank elsewhere). Late deliveries past ~1.1 ms that come
with a matching `loop max` and run-queue wait are the machine's, not the link's.

The sender tops the link up whenever less than `--backlog-ms` of traffic is queued (by the
same analytic schedule) and otherwise sleeps ~1 ms, so the measurement includes the loop's
real scheduling. If the sender ever let the link go idle the run counts it under `gaps`
(the sender's fault, not the link's; the throughput then undershoots honestly). Every loop
is bounded in both message count and time. Exit status: 0 if every rate passes, 1 if not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from testbed.common.stats import percentile
from testbed.emulation.clock import run
from testbed.emulation.link import EmulatedLink

THROUGHPUT_TOL = 0.02  # relative
LATE_MAX_MS = 2.0
EARLY_TOL_S = 1e-6  # a delivery this much before its arrival is a link bug
SIZES = {1.0: 1500, 10.0: 8192, 100.0: 16_384, 1000.0: 65_536}  # bytes per message


def message_size(rate_mbps: float) -> int:
    """~1 ms of traffic per message, at least a 1500 B packet and at most 64 KiB."""
    if rate_mbps in SIZES:
        return SIZES[rate_mbps]
    per_ms = rate_mbps * 1e6 / 8 / 1e3
    return int(min(65_536, max(1500, 2 ** round(math.log2(max(per_ms, 1.0))))))


@dataclass
class RateResult:
    rate_mbps: float
    size: int
    latency_ms: float
    sent: int
    delivered: int
    in_order: bool
    gaps: int  # times the sender let the link go idle
    throughput_mbps: float
    throughput_err_pct: float
    late_mean_ms: float
    late_p50_ms: float
    late_p99_ms: float
    late_max_ms: float
    early_max_us: float  # most negative lateness, as a positive number (should be ~0)
    loop_late_max_ms: float  # the sender's sleep wake-ups: the loop's own timer lateness
    runq_wait_ms: float | None  # time this process waited runnable for a CPU
    seconds: float  # first send to last delivery, real time
    passed: bool
    why: str


async def bench_rate(rate_mbps: float, seconds: float, latency_ms: float, size: int,
                     backlog_ms: float) -> RateResult:
    loop = asyncio.get_running_loop()
    link = EmulatedLink("bench", "sink", rate_mbps, latency_ms, 0.0, loop)
    rate = rate_mbps * 1e6 / 8  # bytes/s
    tx = size / rate
    lat = latency_ms / 1e3
    backlog = max(backlog_ms / 1e3, 4 * tx)
    max_msgs = math.ceil(seconds / tx * 1.1) + math.ceil(backlog / tx) + 4
    frame = bytes(size)

    sent_at: list[float] = []
    finish: list[float] = []  # analytic
    got: list[float] = [math.nan] * max_msgs
    order: list[int] = []

    def on_deliver(i: int, _frame: bytes) -> None:
        got[i] = loop.time()
        order.append(i)

    gaps = 0
    wake_late = [0.0]
    runq0 = runqueue_wait_ms()
    t0 = loop.time()
    deadline = t0 + seconds
    while len(sent_at) < max_msgs and loop.time() < deadline:
        now = loop.time()
        while len(sent_at) < max_msgs and (not finish or finish[-1] - now < backlog):
            i = len(sent_at)
            now = loop.time()
            if finish and now > finish[-1]:
                gaps += 1
            sent_at.append(now)
            finish.append(max(now, finish[-1] if finish else now) + tx)
            link.send(frame, partial(on_deliver, i))
        before = loop.time()
        await asyncio.sleep(0.001)
        wake_late.append(loop.time() - before - 0.001)

    n = len(sent_at)
    drain_deadline = loop.time() + max(0.0, finish[-1] - loop.time()) + lat + 1.0
    while len(order) < n and loop.time() < drain_deadline:
        await asyncio.sleep(0.005)
    t_end = loop.time()
    runq1 = runqueue_wait_ms()

    delivered = [i for i in range(n) if not math.isnan(got[i])]
    in_order = order == list(range(n))
    late = [got[i] - (finish[i] + lat) for i in delivered]
    span = got[delivered[-1]] - got[delivered[0]] if len(delivered) > 1 else 0.0
    thr = (len(delivered) - 1) * size / span * 8 / 1e6 if span > 0 else 0.0
    err = (thr / rate_mbps - 1) * 100
    late_ms = [x * 1e3 for x in late] or [math.nan]
    r = RateResult(
        rate_mbps=rate_mbps, size=size, latency_ms=latency_ms, sent=n,
        delivered=len(delivered), in_order=in_order, gaps=gaps,
        throughput_mbps=thr, throughput_err_pct=err,
        late_mean_ms=sum(late_ms) / len(late_ms), late_p50_ms=percentile(late_ms, 50),
        late_p99_ms=percentile(late_ms, 99), late_max_ms=max(late_ms),
        early_max_us=max(0.0, -min(late_ms) * 1e3), loop_late_max_ms=max(wake_late) * 1e3,
        runq_wait_ms=None if runq0 is None or runq1 is None else runq1 - runq0,
        seconds=t_end - t0, passed=False, why="")
    why = []
    if r.delivered != n or not in_order:
        why.append(f"lost/dup/reordered ({r.delivered}/{n}, in order {in_order})")
    if n < 20:
        why.append(f"only {n} messages")
    if not abs(err) <= THROUGHPUT_TOL * 100:
        why.append(f"throughput {err:+.2f} %")
    if not r.late_max_ms <= LATE_MAX_MS:
        why.append(f"late {r.late_max_ms:.2f} ms")
    if r.early_max_us > EARLY_TOL_S * 1e6:
        why.append(f"early {r.early_max_us:.1f} us")
    r.passed, r.why = not why, "; ".join(why)
    return r


def runqueue_wait_ms() -> float | None:
    """Total time this process has waited runnable for a CPU (Linux), in ms."""
    try:
        with open("/proc/self/schedstat") as f:
            return int(f.read().split()[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return None


def table(results: list[RateResult]) -> str:
    head = (f"{'Mbit/s':>8} {'msg B':>7} {'msgs':>6} {'gaps':>4} {'thr Mbit/s':>11} {'err %':>7}"
            f" {'late mean':>9} {'p99':>6} {'max':>6} {'early us':>8} {'loop max':>8}"
            f" {'runq ms':>7}  result")
    lines = [head, "-" * len(head)]
    for r in results:
        runq = "" if r.runq_wait_ms is None else f"{r.runq_wait_ms:.1f}"
        lines.append(
            f"{r.rate_mbps:>8g} {r.size:>7} {r.sent:>6} {r.gaps:>4} {r.throughput_mbps:>11.4f}"
            f" {r.throughput_err_pct:>+7.3f} {r.late_mean_ms:>9.3f} {r.late_p99_ms:>6.3f}"
            f" {r.late_max_ms:>6.3f} {r.early_max_us:>8.3f} {r.loop_late_max_ms:>8.3f}"
            f" {runq:>7}  " + ("PASS" if r.passed else f"FAIL ({r.why})"))
    lines.append(f"(lateness in ms; targets: throughput within {THROUGHPUT_TOL:.0%}, "
                 f"every delivery at most {LATE_MAX_MS:g} ms late)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench.link",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.5, help="sending time per rate (s)")
    ap.add_argument("--rates", type=str, default="1,10,100,1000",
                    help="comma-separated rates in Mbit/s")
    ap.add_argument("--latency-ms", type=float, default=5.0)
    ap.add_argument("--backlog-ms", type=float, default=20.0,
                    help="traffic the sender keeps queued ahead of the link (ms)")
    ap.add_argument("--size", type=int, default=None,
                    help="message size in bytes for every rate (default: per rate)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    rates = [float(x) for x in args.rates.split(",") if x.strip()]
    if not rates or any(r <= 0 for r in rates) or args.seconds <= 0 or args.latency_ms < 0:
        ap.error("rates and --seconds must be > 0, --latency-ms >= 0")

    async def bench() -> list[RateResult]:
        return [await bench_rate(r, args.seconds, args.latency_ms,
                                 args.size or message_size(r), args.backlog_ms)
                for r in rates]

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = run(bench, "real")
    print(table(results))
    ok = all(r.passed for r in results)
    if args.json:
        doc = {
            "benchmark": "bench_link", "version": 1,
            "targets": {"throughput_rel": THROUGHPUT_TOL, "late_max_ms": LATE_MAX_MS},
            "params": {"seconds": args.seconds, "latency_ms": args.latency_ms,
                       "backlog_ms": args.backlog_ms, "rates_mbps": rates},
            "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                        "cpus": os.cpu_count(), "loadavg_before": load},
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "passed": ok,
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
