"""Choosing the real clock's time scale K for a scenario on this host (`--time-scale auto`).

On the real clock every emulated window (a job's compute time, a frame's transfer) lasts K
times longer on the wall clock, and the host must do its own work for it (torch, asyncio,
encoding frames) inside that stretched window; when it cannot, the job ends late and the
host's speed enters the results. The calibration measures what this host needs, per
algorithm of the command (the largest K wins, so algorithms are compared at one scale):

1. a *virtual pilot*: the first tokens of the scenario on the virtual clock (fast; its
   emulated schedule is the one the real run must reproduce), every compute job traced:
   its emulated window [start, finish] and the wall time of its torch work; the host's
   other CPU time per token (messages, asyncio, the controller) is shared out over the
   jobs, and over websockets each frame's measured socket hop is added. A *replay* of
   those jobs through one CPU (`fit_time_scale`, pure: a job is released when its window
   opens, K x start on the wall clock, and must be done when it closes, first come first
   served) gives the smallest K at which they fit: a first guess;
2. a *real pilot*: a few tokens on the real clock at PROBE_FACTOR times that guess, with
   the run's own transport and agent processes, since a host that sleeps between jobs
   pays more per job than one that works back to back (cold caches, timer wake-ups,
   sockets). Each device reports the share of its jobs' windows the host needed; at the
   95th percentile, probe x share is the scale that would be just enough.

K is the larger of the two, times MARGIN for the noise of a shared machine.

A re-plan is host work too: it must be done within its modelled cost on the controller's
device (`placement.policy.decision_cost_s`), or everything after it runs late. At the end of
the virtual pilot the controller decides DECISION_REPEAT more times on its current view
(warm, as the run's re-plans are); the median of their host times over their cost is the
scale the decisions need, and K is at least that times the margin (an algorithm that
never re-plans needs none: its one decision is made before anything runs).

Devices compute early on the real clock, in process and in agent processes alike (a job's
arithmetic starts when its input's content exists, long before its emulated arrival; see
`agents/device.py` and `transport/ws.py`), so the
replay's constraint (each job's host work inside its own window) is only an upper bound:
what counts is that the arithmetic is done by the window's end and that the host keeps
pace with the emulated tokens. That is measured directly: real-clock pilots at falling
scales from where the host only just keeps pace (the virtual pilot's host time over its
emulated time) up by STEP, until a pilot keeps its jobs on time (at most
EARLY_ALLOWED of them overran) and no report reached its controller after it had acted
without it; that scale, times EARLY_MARGIN, is K. Every run checks the result:
`summary.json` reports the jobs that still overran and the reports that missed a decision
(`fidelity`), and which K would have fitted.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..emulation.compute import ComputeUnit
from ..harness.rows import DeviceRow
from ..placement.policy import Stop
from ..scenario.format import MAX_TIME_SCALE
from .twin import OVERRUN_LIMIT

LATE_SHARE = ComputeUnit.LATE_SHARE  # as the runs count overruns

PILOT_TOKENS = 16  # virtual pilot, prefill included
REAL_PILOT_TOKENS = 8  # real-clock pilot, prefill included
PROBE_FACTOR = 2.0  # the real pilot runs at this multiple of the virtual pilot's fit
# computing early: each real-clock pilot that fell behind is followed by one at this multiple
# of its scale (1.5, not 2: a pilot that fails at 2 and would keep up at 3 then gives 3, not
# 4, before the margin; SmolLM2 with agent processes is faithful at 3)
STEP = 1.5
MARGIN = 3.0
ALLOWED_LATE = 0.002  # fraction of replayed jobs that may miss their window at the fitted K
# the share of a pilot's jobs that may overrun: twice a run's own limit
# (twin.OVERRUN_LIMIT), as an 8-token pilot has few jobs; the margin below covers the
# difference (and no report may reach the controller after it acted without it)
EARLY_ALLOWED = 2 * OVERRUN_LIMIT
# ... and the margin over the smallest scale whose 8-token pilot kept up (measured, not
# replayed): a whole run meets more (re-plans, migrations) than a pilot, and the scale
# rises during the run when the host falls behind (adapt.py). Measured on the main job
# (docs/fidelity.md): a pilot keeps up at 2x, 2x itself has 0.3-1.1 % of jobs overrun
# over a whole run, 3x 0-0.14 %
EARLY_MARGIN = 1.5
# a pilot judged after its prefill (in process) must also keep the prefill's own overruns
# within this share of the whole run's jobs (the run's verdict counts every job, and a
# prefill happens once: on fast devices (edge_presets) its jobs overran at scales whose
# decode kept up, 2.2-2.7 % of a 32-token run's jobs at K 6)
PREFILL_SHARE = OVERRUN_LIMIT / 2
DECISION_REPEAT = 3  # timed decisions at the end of the virtual pilot


@dataclass(frozen=True)
class Job:
    """One traced job: its emulated window and the host seconds it needs."""

    start: float
    finish: float
    host_s: float


def late_fraction(jobs: Sequence[Job], k: float) -> float:
    """Replay `jobs` through one host CPU at time scale k (first come, first served, in order
    of release); the fraction that end later than LATE_SHARE of their window after it."""
    t, late = -math.inf, 0
    for j in sorted(jobs, key=lambda j: (j.start, j.finish)):
        t = max(t, k * j.start) + j.host_s
        if t > k * (j.finish + LATE_SHARE * (j.finish - j.start)):
            late += 1
    return late / len(jobs) if jobs else 0.0


def fit_time_scale(jobs: Sequence[Job], allowed: float = ALLOWED_LATE, hi: float = MAX_TIME_SCALE) -> float:
    """The smallest time scale (to 2 %) at which at most `allowed` of the jobs miss their
    window in the replay; `hi` if even that is not enough."""
    if late_fraction(jobs, 1.0) <= allowed:
        return 1.0
    if late_fraction(jobs, hi) > allowed:
        return hi
    lo, up = 1.0, hi
    while up / lo > 1.02:
        mid = math.sqrt(lo * up)
        if late_fraction(jobs, mid) <= allowed:
            up = mid
        else:
            lo = mid
    return up


@dataclass(frozen=True)
class Calibration:
    time_scale: float
    fitted: float  # before the margin
    jobs: int
    tokens: int
    probe_scale: float  # the real-clock pilot's time scale
    probe_share: float  # ... and the share of a window its host work needed there (p95)
    host_ms_median: float  # per job: torch work + its share of the rest
    window_ms_median: float  # per job: emulated compute window
    hop_ms: float  # added per frame over websockets (0 in process)
    seconds: float  # the calibration's own wall time
    expected_wall_s: float  # of one run at this scale (extrapolated from the virtual pilot)
    skipped: dict[str, str] = field(default_factory=dict)  # algorithms whose pilot failed, and why
    margin: float = MARGIN
    early: bool = False  # devices compute early, and real pilots found the scale
    decision_scale: float = 0.0  # a re-plan's host time over its modelled cost (median of the pilot's timed ones)

    def line(self) -> str:
        head = (f"time scale {self.time_scale:g} (auto): this host needs {self.host_ms_median:.3f} ms per job "
                f"against emulated windows of {self.window_ms_median:.3f} ms (medians of a virtual pilot); ")
        tail = (f"x{self.margin:g} margin; calibrated in {self.seconds:.1f} s; "
                f"expect about {self.expected_wall_s:.0f} s of wall time per run")
        if self.decision_scale > self.fitted:
            tail = (f"a re-plan needs {self.decision_scale:.3g}x its modelled cost in host time, which decides; "
                    + tail)
        if self.early:
            return (head + f"computing early, a {self.tokens}-token real-clock pilot kept its jobs on time "
                    f"at {self.fitted:.3g}x; " + tail)
        return (head + f"a {self.tokens}-token pilot at {self.probe_scale:g}x used up to {self.probe_share:.0%} of a "
                f"window (p95), so {self.fitted:.3g}x is just enough; " + tail)

    def to_dict(self) -> dict[str, Any]:
        return {"time_scale": self.time_scale, "fitted": round(self.fitted, 3), "margin": self.margin, "early": self.early,
                "pilot_tokens": self.tokens, "probe_time_scale": self.probe_scale,
                "probe_host_share_p95": round(self.probe_share, 4), "jobs": self.jobs,
                "host_ms_median": round(self.host_ms_median, 4), "window_ms_median": round(self.window_ms_median, 4),
                "hop_ms": round(self.hop_ms, 4), "seconds": round(self.seconds, 2),
                "expected_wall_s": round(self.expected_wall_s, 1), "skipped": self.skipped,
                "decision_scale": round(self.decision_scale, 3)}


def _median(xs: Sequence[float]) -> float:
    ys = sorted(xs)
    return ys[len(ys) // 2] if ys else math.nan


def calibrate(prep: Any, algorithms: Sequence[Any], transport: str = "inproc", processes: bool = False,
              tokens: int = PILOT_TOKENS, real_tokens: int = REAL_PILOT_TOKENS, early: bool = True) -> Calibration:
    """The time scale for running `prep`'s scenario with each of `algorithms` over `transport`
    (agents in `processes` or not): the largest any of them needs, so that they are compared
    at one scale. `early`: the devices compute early (every real-clock run but one whose
    links the kernel shapes)."""
    from . import run as experiment

    w0 = time.perf_counter()
    hop = ws_hop_seconds(prep.model) if transport == "ws" else 0.0
    fitted, best, k_probe, share, per_token, decisions = 1.0, [], 1.0, 0.0, 0.0, 0.0
    failed: dict[str, str] = {}
    for alg in algorithms:
        try:
            # a first guess from the virtual clock, where the host works back to back ...
            jobs, summary, dec = _pilot(experiment, _shorter(prep, tokens), alg, hop)
            decisions = max(decisions, dec)
            per_token = max(per_token, summary["emulated_s"] / max(1, summary["tokens"]))
            first = fit_time_scale(jobs)
            # ... then a real-clock pilot at a few times that scale, as the run will be (same
            # transport, agents in processes if asked): a host that sleeps between jobs pays
            # more per job (cold caches, timer wake-ups, sockets). The share of its window the
            # host needed, at the 95th percentile, says which scale would be just enough.
            if early:
                floor = summary["wall_s"] / max(1e-9, summary["emulated_s"])
                probe = _smallest_on_time(experiment, _shorter(prep, real_tokens), alg, floor, first,
                                          transport, processes, prep.scenario.generation.new_tokens)
                s = 1.0
            else:
                probe = min(MAX_TIME_SCALE, max(2.0, float(math.ceil(PROBE_FACTOR * first))))
                s = _real_share(experiment, _shorter(prep, real_tokens), alg, probe, transport, processes)
        except RuntimeError as e:  # this algorithm fails anyway: its own run will say why
            failed[_name(alg)] = str(e)
            continue
        k = probe if early else max(first, probe * s)
        if k >= fitted:
            fitted, best, k_probe, share = k, jobs, probe, s
    if len(failed) == len(algorithms):
        raise RuntimeError("; ".join(f"{a}: {why}" for a, why in failed.items()))
    margin = EARLY_MARGIN if early else MARGIN
    k = min(MAX_TIME_SCALE, round_up(max(fitted, decisions) * margin))
    return Calibration(k, fitted, len(best), min(real_tokens, prep.scenario.generation.new_tokens), k_probe,
                       share, 1e3 * _median([j.host_s for j in best]),
                       1e3 * _median([j.finish - j.start for j in best]), 1e3 * hop, time.perf_counter() - w0,
                       k * per_token * prep.scenario.generation.new_tokens, failed, margin, early, decisions)


def _smallest_on_time(experiment: Any, prep: Any, algorithm: Any, floor: float, first: float,
                      transport: str = "inproc", processes: bool = False,
                      run_tokens: int = REAL_PILOT_TOKENS) -> float:
    """Computing early: the smallest scale in floor, STEP floor, STEP^2 floor, ... (each
    `round_up`: whole numbers from 1, tenths below it, where the host is faster than the
    emulated devices) at which a real-clock pilot keeps its jobs on time and misses no report;
    `floor` is where the host only just keeps pace with the emulated tokens (the virtual
    pilot's host time over its emulated time). Past PROBE_FACTOR x `first` (the replay's
    bound without computing early), that bound: a host too busy to say. A pilot's jobs are
    judged after its prefill, as the virtual pilot's and the watcher's are (the prefill's
    first jobs start with nothing computed ahead: on an 8-token pilot its one or two
    overruns alone are most of the allowance), and the prefill's overruns must stay within
    PREFILL_SHARE of the jobs of a run of `run_tokens` tokens (the decode's jobs per token as
    in the pilot), in process and with agent processes alike."""
    k = round_up(floor)
    cap = max(1.0, PROBE_FACTOR * first)
    while k < cap:
        seen = _AfterPrefill()
        with tempfile.TemporaryDirectory(prefix="testbed-calibration-") as tmp:
            out = experiment.run(prep, algorithm, Path(tmp) / "pilot", clock="real", time_scale=k,
                                 transport=transport, processes=processes, adapt=False,
                                 setup=seen.setup, progress=seen.progress, on_finish=seen.finish)
        if not out.ok:
            raise RuntimeError(f"the real-clock calibration pilot did not complete: {out.status}")
        s = out.summary
        late = seen.fraction()
        prefill_ok = late is None or seen.prefill_share(_tokens(prep), run_tokens) <= PREFILL_SHARE
        if (s["overrun_fraction"] if late is None else late) <= EARLY_ALLOWED and prefill_ok \
                and not s.get("missed_reports"):
            return k
        k = round_up(STEP * k)
    return min(MAX_TIME_SCALE, cap)


class _AfterPrefill:
    """A pilot's jobs and overruns after its prefill, from the world's device rows (the
    interface every world has: in process, and agent processes through their control
    channels): `setup`, `progress` and `finish` are the run's hooks. The counts after the
    prefill are asked for when its token is written and arrive a moment later (at once in
    process, after a control round trip with agent processes), so the first jobs of the
    next token may count as the prefill's."""

    def __init__(self) -> None:
        self._world: Any = None
        self._after: asyncio.Task[tuple[int, int]] | None = None
        self._at: list[tuple[int, int]] = []  # (jobs, overruns) after the prefill, and at the end

    async def _counts(self) -> tuple[int, int]:
        rows = await self._world.device_rows()
        return sum(r.jobs for r in rows), sum(r.overruns for r in rows)

    def setup(self, world: Any) -> None:
        self._world = world

    def progress(self, k: int) -> None:
        if k == 0 and self._world is not None and self._after is None:
            self._after = asyncio.get_running_loop().create_task(self._counts())

    async def finish(self, world: Any, controller: Any) -> None:
        if self._after is not None:
            self._at = [await self._after, await self._counts()]

    def fraction(self) -> float | None:
        """Overruns over jobs after the prefill; None when not known (or no job after it)."""
        if len(self._at) != 2 or self._at[1][0] <= self._at[0][0]:
            return None
        (j0, o0), (j1, o1) = self._at
        return (o1 - o0) / (j1 - j0)

    def prefill_share(self, tokens: int, run_tokens: int) -> float:
        """The prefill's overruns over the jobs of a run of `run_tokens` tokens, as many per
        token after the prefill as this pilot of `tokens` had (call when `fraction` is known)."""
        (j0, o0), (j1, _) = self._at
        per_token = (j1 - j0) / max(1, tokens - 1)
        return o0 / max(1.0, j0 + per_token * max(0, run_tokens - 1))


def round_up(k: float) -> float:
    """A time scale rounded up: to a whole number from 1, to tenths below (at least 0.1)."""
    return float(math.ceil(k)) if k >= 1 else max(0.1, math.ceil(10 * k - 1e-9) / 10)


def _real_share(experiment: Any, prep: Any, algorithm: Any, k: float, transport: str, processes: bool) -> float:
    """Run a short pilot on the real clock at time scale k; the largest (over devices) 95th
    percentile of the share of its emulated window a job's host work needed. (A pilot has a
    few dozen jobs per device, where the 99th percentile is the single worst one: one
    wake-up delayed by another process would decide the scale.)"""
    rows: list[DeviceRow] = []

    async def on_finish(world: Any, controller: Any) -> None:
        rows.extend(await world.device_rows())

    with tempfile.TemporaryDirectory(prefix="testbed-calibration-") as tmp:
        out = experiment.run(prep, algorithm, Path(tmp) / "pilot", clock="real", time_scale=k,
                             transport=transport, processes=processes, on_finish=on_finish, adapt=False)
    if not out.ok:
        raise RuntimeError(f"the real-clock calibration pilot did not complete: {out.status}")
    return max((r.host_share_p95 for r in rows), default=0.0)


def _name(alg: Any) -> str:
    return alg if isinstance(alg, str) else str(getattr(alg, "name", alg))


def _tokens(prep: Any) -> int:
    """The tokens a (pilot's) prepared scenario generates; REAL_PILOT_TOKENS without one."""
    return int(prep.scenario.generation.new_tokens) if prep is not None else REAL_PILOT_TOKENS


def _shorter(prep: Any, tokens: int) -> Any:
    from dataclasses import replace

    scen = prep.scenario
    n = min(tokens, scen.generation.new_tokens)
    return replace(prep, scenario=replace(scen, generation=replace(scen.generation, new_tokens=n)))


def _pilot(experiment: Any, prep: Any, algorithm: Any, hop_s: float) -> tuple[list[Job], dict[str, Any], float]:
    """Run a pilot in process on the virtual clock, tracing every job; returns the jobs of the tokens after the
    prefill's (its one-off costs, like torch's first calls, are not the steady state), each
    charged its torch time plus an equal share of the host's other CPU time during those
    tokens, plus `hop_s` per frame sent; the summary; and the scale the re-plans need
    (`decision_scale` at the pilot's end)."""
    traces: list[list[tuple[float, float, float]]] = []
    marks: list[tuple[float, int]] = []  # (CPU time, frames sent so far) after each token
    world_ref: list[Any] = []

    def setup(world: Any) -> None:
        world_ref.append(world)
        for agent in world.agents.values():
            agent.compute.trace = []
            traces.append(agent.compute.trace)

    def progress(k: int) -> None:
        world = world_ref[0]
        marks.append((time.process_time(), sum(lk.frames_sent for lk in world.links().values())))
        for agent in world.agents.values():  # devices that joined during the pilot
            if agent.compute.trace is None:
                agent.compute.trace = []
                traces.append(agent.compute.trace)
        for tr in traces:  # token boundary marker; a job's record is (start, finish, seconds)
            tr.append((math.nan, float(k), 0.0))

    scales: list[float] = []

    async def on_finish(world: Any, controller: Any) -> None:
        scales.append(await decision_scale(controller))

    with tempfile.TemporaryDirectory(prefix="testbed-calibration-") as tmp:
        out = experiment.run(prep, algorithm, Path(tmp) / "pilot", clock="virtual", setup=setup,
                             progress=progress, on_finish=on_finish)
    if not out.ok or len(marks) < 2:
        raise RuntimeError(f"the calibration pilot did not complete: {out.status}")
    dec = scales[0] if scales else 0.0
    # the jobs of tokens 1..n-1 (after the first boundary marker of each device)
    mine: list[tuple[float, float, float]] = []
    for tr in traces:
        seen_first = False
        for start, finish, wall in tr:
            if math.isnan(start):
                seen_first = True
            elif seen_first:
                mine.append((start, finish, wall))
    if not mine:
        return [], out.summary, dec
    cpu = marks[-1][0] - marks[0][0]  # this process's CPU time during tokens 1..n-1
    frames = marks[-1][1] - marks[0][1]
    torch_s = sum(w for _, _, w in mine)
    share = max(0.0, cpu - torch_s) / len(mine) + hop_s * frames / len(mine)
    return [Job(s, f, w + share) for s, f, w in mine], out.summary, dec


async def decision_scale(controller: Any, repeat: int = DECISION_REPEAT) -> float:
    """The time scale at which this host's re-plans just fit their modelled cost: the
    controller decides `repeat` times on its current view (warm, as a run's re-plans are;
    nothing is applied), and the median host time over the cost is returned. 0 for an
    algorithm that never re-plans."""
    policy = controller.policy
    if not policy.algorithm.dynamic:
        return 0.0
    snap = await controller.snapshot()
    ratios = []
    for _ in range(repeat):
        w0 = time.perf_counter()
        try:
            d = policy.decide(snap, "calibration")
        except Stop:  # no placement on this view: the run's own decisions will say why
            return 0.0
        host_s = time.perf_counter() - w0
        cost = policy.cost_s(d)
        ratios.append(host_s / cost if cost > 0 else 0.0)
    return _median(ratios)


def ws_hop_seconds(model: Any, frames: int = 200) -> float:
    """Host seconds per websocket frame of a hidden state (both ends in this process, on
    loopback): encoding, the socket write and read, decoding."""
    from ..emulation.clock import run
    from ..model import cost
    from ..scenario.records import LinkSpec
    from ..transport.ws import WsEndpoint

    size = cost.hidden_bytes(model)

    async def main() -> float:
        import secrets

        import numpy as np

        token = secrets.token_urlsafe(24)
        a, b = WsEndpoint("a", token), WsEndpoint("b", token)
        got = asyncio.Event()
        count = [0]

        def on(sender: str, msg: dict[str, Any], at: float | None) -> None:
            count[0] += 1
            if count[0] == frames:
                got.set()

        b.handler = on
        try:
            await a.start()
            await b.start()
            fast = LinkSpec(bandwidth_mbps=1e6, latency_ms=0.0, burst_kib=0.0)
            a.add_peer("b", b.url, fast)
            b.add_peer("a", a.url, fast)
            await asyncio.gather(a.connect(), b.connect())
            payload = np.zeros(max(1, size // 4), dtype=np.float32)
            t0 = time.perf_counter()
            for i in range(frames):
                a.send("b", {"t": "probe", "n": i, "pad": payload.tobytes()})
            await asyncio.wait_for(got.wait(), 30)
            return (time.perf_counter() - t0) / frames
        finally:
            await a.close()
            await b.close()

    return float(run(main, "real"))
