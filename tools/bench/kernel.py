"""The emulated link against the Linux kernel's (python -m tools.bench.kernel): the outside
reference for testbed/emulation/link.py.

One frame trace, recorded from a run (the busiest link of `scenarios/bandwidth_drop.yaml`,
`--tokens` tokens, in process on the virtual clock: each frame's size and the emulated
time it was handed to the link), goes through two links of the same rate and burst:

- the emulated link (`EmulatedLink`, latency 0, on the virtual clock: its arrivals are the
  analytic ones), once as the runs use it and once with `header_bytes` (the option this
  comparison gave it: the kernel's per-segment headers);
- a veth pair between two network namespaces shaped by tbf (both directions: the
  receiver's ACKs are shaped too), carrying the frames over real TCP (4-byte length
  prefix, TCP_NODELAY); the receiver stamps each frame's arrival on CLOCK_MONOTONIC
  (`kernel_peer.py`).

Two passes per rate and burst. Paced: frames leave at the trace's own times (shifted so the
first leaves at 0); per-frame arrival differences, kernel minus emulated (mean, p95, max,
in ms). Bulk: the same frames all at once, so the link is backlogged; throughput is the
bytes after the first frame over the time from its arrival to the last (the same on both
sides). The causes, measured: the share of the kernel's bytes that are headers (Ethernet
14 + IPv4 20 + TCP 20 + timestamps 12 = 66 bytes a segment, at the segment size the sender's
socket reports), the burst tbf was given (never below one Ethernet frame: tbf refuses a
packet larger than its bucket) and what TCP did (retransmissions; the rest of the paced
difference after headers: slow start, ACK clocking, the host). The trace is cut to about
`--seconds` of traffic at each rate, so a rate costs about that much wall time.

`--run SCENARIO` instead runs the scenario twice with agent processes at one time scale
(`runners.run --processes --quiet`, `--links emulated`, then `--links kernel`) and prints
each run's per-token latency (mean, p50, p95, max), its tokens against the reference, its
migrations and overruns side by side (results/kernel/runs.json).

Needs root and ip/tc (refused in one line, exit 2, otherwise). Writes
results/kernel/kernel.json and prints the markdown table (docs/fidelity.md quotes it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from testbed.common.stats import percentile
from testbed.emulation.clock import run as run_loop
from testbed.emulation.link import EmulatedLink
from testbed.harness import kernel
from testbed.harness.kernel import KernelLinks
from testbed.harness.netplan import ETH_FRAME, plan, shape

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "scenarios" / "bandwidth_drop.yaml"
TCP_HEADERS = 14 + 20 + 20 + 12  # Ethernet, IPv4, TCP, TCP timestamps: bytes a segment
PREFIX = 4  # the length prefix each frame carries over TCP
PORT = 7100
RATES = (1.0, 10.0, 100.0, 1000.0)
BURSTS = (ETH_FRAME, 64 * 1024)
BULK_BURSTS = 16  # a backlogged pass carries at least this many bursts


@dataclass
class Row:
    rate_mbps: float
    burst: int
    frames: int
    bytes: int
    mean_ms: float  # paced: kernel arrival - emulated arrival
    p95_ms: float
    max_ms: float
    mean_hdr_ms: float  # the same against the emulated link with header bytes
    p95_hdr_ms: float
    emu_mbps: float  # bulk throughput (payload)
    emu_hdr_mbps: float
    kernel_mbps: float
    unshaped_mbps: float  # the same veth pair without tbf: what the host can carry
    header_share: float  # of the kernel's bytes on the wire
    mss: int
    retrans: int

    @property
    def gap(self) -> float:
        return self.emu_mbps / self.kernel_mbps - 1

    @property
    def gap_hdr(self) -> float:
        return self.emu_hdr_mbps / self.kernel_mbps - 1


def record_trace(tokens: int) -> list[tuple[float, int]]:
    """(send time, size) of every frame on the link of a virtual run that carried the most."""
    from testbed.experiments.run import prepare
    from testbed.experiments.run import run as run_scenario
    from testbed.scenario import load

    links: list[EmulatedLink] = []
    init = EmulatedLink.__init__

    def recording(self: EmulatedLink, *a: Any, **k: Any) -> None:
        init(self, *a, **k)
        self.record = []
        links.append(self)

    scen = load(SCENARIO).with_overrides(new_tokens=tokens)
    prep = prepare(scen)
    with tempfile.TemporaryDirectory() as d, mock.patch.object(EmulatedLink, "__init__", recording):
        out = run_scenario(prep, scen.controller.algorithm, Path(d) / "run", clock="virtual")
    if out.status != "completed":
        raise RuntimeError(f"the trace's run did not complete: {out.status}")
    busiest = max(links, key=lambda lk: len(lk.record or []))
    return [(t.enqueued, t.size) for t in busiest.record or []]


def cut(trace: list[tuple[float, int]], rate_mbps: float, seconds: float,
        at_least: int = 0) -> list[tuple[float, int]]:
    """About `seconds` of the trace's traffic at this rate (and at least `at_least` frames),
    from time 0, none sent later than `seconds`: its first frames, or the trace again and
    again (each repeat starting where the last one's span ended) when it holds fewer bytes."""
    budget = rate_mbps * 1e6 / 8 * seconds
    t0 = trace[0][0]
    span = trace[-1][0] - t0
    out: list[tuple[float, int]] = []
    total = 0
    for rep in range(1_000_000):  # bounded: the budget ends it long before
        for at, size in trace:
            if out and (total + size > budget or at - t0 + rep * span > seconds) and len(out) >= at_least:
                return out
            out.append((at - t0 + rep * span, size))
            total += size
    return out


def emulated(frames: list[tuple[float, int]], rate_mbps: float, burst: int, header: int) -> list[float]:
    """Arrival times through an emulated link on the virtual clock (latency 0)."""
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        link = EmulatedLink("a", "b", rate_mbps, 0.0, burst / 1024, header_bytes=header)
        arrivals: list[float] = []
        for at, size in frames:
            await asyncio.sleep(max(0.0, t0 + at - loop.time()))
            link.send(bytes(size + PREFIX), lambda f: arrivals.append(loop.time() - t0))
        for _ in range(10_000_000):  # bounded; the virtual clock makes each wait free
            if len(arrivals) == len(frames):
                break
            await asyncio.sleep(0.001)
        return arrivals

    return run_loop(main, "virtual")


def through_kernel(k: KernelLinks, frames: list[tuple[float, int]]) -> tuple[list[float], dict[str, Any]]:
    """Arrival times (from the sender's t0) through the kernel's shaped veth pair."""
    py = [sys.executable, "-m", "tools.bench.kernel_peer"]
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump({"t0_delay": 0.2, "frames": frames}, f)
        f.flush()
        recv = subprocess.Popen([*k.exec_prefix("b"), *py, "recv", str(PORT), str(len(frames))],
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            sent = subprocess.run([*k.exec_prefix("a"), *py, "send", k.plan.address("b"), str(PORT), f.name],
                                  capture_output=True, text=True, cwd=ROOT, timeout=90)
            out, _ = recv.communicate(timeout=90)
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait()
    if sent.returncode != 0 or recv.returncode != 0:
        raise RuntimeError(f"kernel pass failed: {sent.stderr.strip()[-300:]}")
    s = json.loads(sent.stdout)
    arrivals = json.loads(out)["arrivals"]
    if len(arrivals) != len(frames):
        raise RuntimeError(f"kernel pass: {len(arrivals)} of {len(frames)} frames arrived")
    return [t - s["t0"] for t in arrivals], s


def throughput(frames: list[tuple[float, int]], arrivals: list[float], burst: int) -> float:
    """Payload Mbit/s of a backlogged pass that starts at 0 with a full bucket: the bytes
    beyond the burst over the time the last one arrived. The pass holds at least
    `BULK_BURSTS` bursts, so counting the burst as payload errs by under 1 / BULK_BURSTS."""
    return (sum(size for _, size in frames) - burst) * 8 / 1e6 / arrivals[-1]


def measure(trace: list[tuple[float, int]], rate: float, burst: int, seconds: float) -> Row:
    frames = cut(trace, rate, seconds / 2)
    s = shape(rate, burst / 1024, 1.0)
    p = plan(kernel.me(), ["a", "b"], {("a", "b"): s, ("b", "a"): s})
    with KernelLinks(p) as k:
        paced, info = through_kernel(k, frames)
        secs = max(seconds, BULK_BURSTS * s.burst / (rate * 1e6 / 8))
        bulk_frames = [(0.0, size) for _, size in cut(trace, rate, secs, at_least=len(trace))]
        bulk, info2 = through_kernel(k, bulk_frames)
        for end in (p.pair("a", "b"), p.pair("b", "a")):  # the host's own ceiling: no qdisc
            kernel.run(["tc", "-n", end.ns, "qdisc", "del", "dev", end.dev, "root"])
        ceiling, _ = through_kernel(k, bulk_frames)
    header = TCP_HEADERS * 1448 // info["mss"] if info["mss"] != 1448 else TCP_HEADERS
    emu = emulated(frames, rate, s.burst, 0)
    emu_hdr = emulated(frames, rate, s.burst, header)
    diff = [(kt - et) * 1e3 for kt, et in zip(paced, emu, strict=True)]
    diff_hdr = [(kt - et) * 1e3 for kt, et in zip(paced, emu_hdr, strict=True)]
    nbytes = sum(size for _, size in frames)
    return Row(rate, s.burst, len(frames), nbytes,
               sum(diff) / len(diff), percentile(diff, 95), max(diff),
               sum(diff_hdr) / len(diff_hdr), percentile(diff_hdr, 95),
               throughput(bulk_frames, emulated(bulk_frames, rate, s.burst, 0), s.burst),
               throughput(bulk_frames, emulated(bulk_frames, rate, s.burst, header), s.burst),
               throughput(bulk_frames, bulk, s.burst), throughput(bulk_frames, ceiling, s.burst),
               TCP_HEADERS / (info["mss"] + TCP_HEADERS), info["mss"], info["retrans"] + info2["retrans"])


def table(rows: list[Row]) -> str:
    out = ["| Mbit/s | burst B | frames | KiB | paced diff mean / p95 / max ms | with headers mean / p95 ms "
           "| bulk Mbit/s emulated / with headers / kernel | gap / with headers | unshaped Mbit/s | header share | retrans |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.rate_mbps:g} | {r.burst} | {r.frames} | {r.bytes / 1024:.0f} "
                   f"| {r.mean_ms:.3f} / {r.p95_ms:.3f} / {r.max_ms:.3f} | {r.mean_hdr_ms:.3f} / {r.p95_hdr_ms:.3f} "
                   f"| {r.emu_mbps:.3f} / {r.emu_hdr_mbps:.3f} / {r.kernel_mbps:.3f} "
                   f"| {r.gap:+.1%} / {r.gap_hdr:+.1%} | {r.unshaped_mbps:.0f} | {r.header_share:.1%} | {r.retrans} |")
    return "\n".join(out)


RUN_TIMEOUT_S = 1800.0  # wall seconds one run of the scenario may take


def run_both(scenario: Path, tokens: int, time_scale: float, out: Path) -> list[dict[str, Any]]:
    """The scenario with emulated links, then kernel links; one summary each."""
    from testbed.common.stats import percentile as pct
    from testbed.results.read import read_csv

    rows = []
    for links in ("emulated", "kernel"):
        cmd = [sys.executable, "-m", "runners.run", str(scenario), "--processes", "--links", links,
               "--tokens", str(tokens), "--time-scale", f"{time_scale:g}", "--quiet", "--out", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=RUN_TIMEOUT_S)
        lines = [ln.split(" ", 1) for ln in r.stdout.splitlines() if ln.strip()]
        if r.returncode not in (0, 1) or not lines:
            raise RuntimeError(f"--links {links}: exit {r.returncode}: {r.stderr.strip()[-300:]}")
        run_dir = Path(lines[-1][1])
        summary = json.loads((run_dir / "summary.json").read_text())
        _, toks = read_csv(run_dir / "tokens.csv")
        lat = [float(t["latency_ms"]) for t in toks if t["phase"] == "decode"]
        rows.append({"links": links, "status": summary["status"], "tokens": len(toks),
                     "equal": all(t["token_id"] == t["ref_token_id"] for t in toks),
                     "prefill_ms": float(toks[0]["latency_ms"]) if toks else math.nan,
                     "mean_ms": sum(lat) / len(lat), "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95),
                     "max_ms": max(lat), "migrations": summary["migrations"],
                     "overruns": summary["overrun_fraction"], "late": summary["late_delivery_fraction"],
                     "run_dir": str(run_dir)})
    return rows


def run_table(rows: list[dict[str, Any]]) -> str:
    out = ["| links | status | tokens | equal to the reference | prefill ms | decode ms mean / p50 / p95 / max "
           "| migrations | overrun jobs / late deliveries |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['links']} | {r['status']} | {r['tokens']} | {'yes' if r['equal'] else 'NO'} "
                   f"| {r['prefill_ms']:.2f} | {r['mean_ms']:.2f} / {r['p50_ms']:.2f} / {r['p95_ms']:.2f} / "
                   f"{r['max_ms']:.2f} | {r['migrations']} | {r['overruns']:.1%} / {r['late']:.1%} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.kernel", description=__doc__.split("\n")[0])
    p.add_argument("--rates", default=",".join(f"{r:g}" for r in RATES), help="Mbit/s, comma-separated")
    p.add_argument("--bursts", default=",".join(str(b) for b in BURSTS), help="bytes, comma-separated")
    p.add_argument("--tokens", type=int, default=32, help="tokens of the run the trace is recorded from")
    p.add_argument("--seconds", type=float, default=2.0,
                   help="backlogged traffic per rate and burst, wall seconds (the paced pass: half)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "kernel")
    p.add_argument("--run", type=Path, metavar="SCENARIO",
                   help="compare a scenario's runs with emulated and kernel links instead (--tokens, --time-scale)")
    p.add_argument("--time-scale", type=float, default=32.0, help="with --run: the runs' time scale K")
    args = p.parse_args(argv)
    why = kernel.refusal()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if args.run is not None:
        if not args.run.is_file():
            print(f"error: --run: no such scenario file {args.run}", file=sys.stderr)
            return 2
        runs = run_both(args.run.resolve(), args.tokens, args.time_scale, args.out / "runs")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "runs.json").write_text(json.dumps(runs, indent=1))
        print(run_table(runs))
        return 0 if all(r["status"] == "completed" and r["equal"] for r in runs) else 1
    try:
        rates = [float(x) for x in args.rates.split(",")]
        bursts = [int(x) for x in args.bursts.split(",")]
    except ValueError as e:
        print(f"error: --rates/--bursts: {e}", file=sys.stderr)
        return 2
    if not all(0 < r <= 10_000 for r in rates) or not all(ETH_FRAME <= b <= 1 << 24 for b in bursts):
        print(f"error: --rates must be in (0, 10000] Mbit/s and --bursts in [{ETH_FRAME}, 16 MiB]", file=sys.stderr)
        return 2
    trace = record_trace(args.tokens)
    rows = [measure(trace, r, b, args.seconds) for r in rates for b in bursts]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel.json").write_text(json.dumps({"trace_frames": len(trace),
                                                      "rows": [asdict(r) for r in rows]}, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
