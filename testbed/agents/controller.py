"""Controller agent: runs on the source device, drives generation, re-plans, migrates,
recovers from failures.

It reaches the cluster only through a `Port` (messages sent from the source device, and the
messages that arrive there for it), so the same code drives in-process agents and agents in
other processes. Per token it asks the source device to embed and run the pipeline, takes
the logits back, picks the token (greedy) and compares it with the monolithic reference.

When to decide and what an emergency calls for are the policy's (placement/policy.py, the
same rules the analytic simulation follows); the controller executes them. At every
decision epoch (every `interval_tokens` tokens, for algorithms that re-plan) and at once
on an emergency it builds a snapshot (oracle: the emulator's truth; measured: the
`Beliefs` built from reports), calls the placement algorithm and applies the moves with the
two-phase migration: reserve at the destination, send the snapshot
(weights + cache) over the emulated link, install and acknowledge, switch routing
everywhere, free at the source; or, with `controller.migration: pre_copy`, in stages while
generation goes on, switching at a token boundary (precopy.py). Emergencies: a refused cache append (oom), a device gone
(its connection broke, or it stopped answering), a token that stalls (e.g. on a link that
went down). A lost device's blocks are loaded again elsewhere from local weights and their
caches rebuilt by replaying the token history through the pipeline, so the run continues
and its tokens still equal the reference. The messaging, the migration and the recovery are
parts with declared interfaces (parts.py), not mixins.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from ..emulation import clock
from ..emulation.compute import ComputeUnit
from ..model.blocks import next_token
from ..model.spec import ModelSpec
from ..placement.algorithm import Algorithm  # re-exported: what the controller's caller passes
from ..placement.policy import Policy, Stop, TokenCharge
from ..placement.problem import LatencyModel, Placement, Snapshot
from ..placement.window import LoadWindow
from ..scenario.records import Scenario
from ..transport.refusals import Refusals
from . import messages as P
from .beliefs import Beliefs
from .errors import DeviceLost, OutOfMemory, RunFailed, Stalled
from .migration import Migrator
from .parts import Oracle, Port, Recorder, RunHooks, Stats
from .precopy import PreCopier
from .recovery import Recovery
from .requests import Requests
from .timeline import Timeline

__all__ = ["Algorithm", "Controller", "Options", "RunFailed", "OutOfMemory", "DeviceLost", "Stalled"]

log = logging.getLogger(__name__)

# real clock: a re-plan whose host time (wall / K) exceeds its modelled cost by more than this
# share of it is late, as a job is
LATE_DECISION_SHARE = ComputeUnit.LATE_SHARE


@dataclass
class Options:
    interval: int
    telemetry: str  # oracle | measured
    probe_bytes: int = 2048
    request_timeout_s: float = 30.0  # emulated seconds a device may take to answer
    stall_factor: float = 20.0  # an attempt longer than this x predicted has stalled...
    stall_min_s: float = 1.0  # ... and longer than this
    max_attempts: int = P.MAX_ATTEMPTS  # per token, before the run fails (agents allow no more)
    frame_extra: int = 0  # bytes the transport adds to every frame (priced by the estimate)
    window: int = 1  # tokens of observations the planner's view of load covers (LoadWindow)
    migration: str = "stop_and_copy"  # stop_and_copy | pre_copy (precopy.py)


class Controller:
    """Drives generation from the source device. Composed of parts that own their state
    (parts.py): `requests` (messages and answers), `mover` (loading, routing, migration;
    the placement in force), `recovery` (devices lost, joining, cut off) and `policy`
    (when and how to decide, placement/policy.py); it is itself the `Driver` that
    recovery calls back."""

    def __init__(self, scenario: Scenario, model: ModelSpec, algorithm: Algorithm, port: Port,
                 reference: tuple[list[int], torch.Tensor], prompt: list[int], recorder: Recorder,
                 hooks: RunHooks, options: Options, oracle: Oracle) -> None:
        self.scenario, self.model, self.alg = scenario, model, algorithm
        self.port = port
        port.attach(self._on_message)
        self.source_name = port.source
        self.beliefs = Beliefs(model, port.source)
        for d in scenario.devices:
            self.beliefs.add_device(d.name, d.host_blocks, {o: scenario.network.link(d.name, o)
                                                            for o in self.beliefs.names})
        self.ref_ids, self.ref_logits = reference
        self.prompt = prompt
        self.rec, self.hooks, self.opt, self.oracle = recorder, hooks, options, oracle
        self.policy = Policy(algorithm, options.interval, len(prompt))
        self.loop = asyncio.get_running_loop()
        self.stats = Stats()
        self.timeline = Timeline(self.loop)  # the controller's emulated instant (timeline.py)
        self.requests = Requests(port, self.loop, options.request_timeout_s, self._device_lost, self.timeline)
        self.mover = Migrator(model, self.requests, self.beliefs, recorder, self.stats, self)
        self.precopy = PreCopier(model, self.requests, self.beliefs, recorder, self.stats, self, self.mover)
        self.recovery = Recovery(scenario, port.source, self.beliefs, self.requests, self.mover, recorder,
                                 self.stats, self.policy, self)
        self._seq = 0
        self._token_fut: asyncio.Future[tuple[torch.Tensor, float | None]] | None = None
        self._fault: str | None = None
        self._link_at: dict[frozenset[str], float] = {}  # time of the latest alarm per device pair
        self.t0 = 0.0
        self.k = 0  # token being produced
        self.ids: list[int] = []
        self._belief: Snapshot | None = None  # the snapshot of the last decision
        self._tel_task: asyncio.Task[None] | None = None
        self._urgent: str | None = None  # a signal asks for a re-plan before the next token
        self.window = LoadWindow(options.window)
        # every message that reaches us is checked against the run's bounds first
        self.bounds = P.Bounds.for_run(scenario, options.max_attempts)
        self.refusals = Refusals("controller", log)
        self._over = False  # the run is over: agents going away now are not failures
        # reports (and background telemetry rounds) due after the controller's instant, in
        # due order: on the real clock the host may hand them over before the controller
        # has reached their emulated arrival (`_in_order`)
        self._later: list[tuple[float, int, Callable[[], None]]] = []
        self._settled = -math.inf  # real clock: the last instant the transport was settled to
        self._n = itertools.count()
        # real clock: the controller is settling the transport to its instant, and the
        # notices of lost devices due after that instant which came in meanwhile (`_on_report`)
        self._settling = False
        self._held_downs: list[tuple[float, P.Down]] = []

    @property
    def devices(self) -> list[str]:
        return self.beliefs.names

    @property
    def placement(self) -> Placement | None:
        """The placement in force (the mover's)."""
        return self.mover.placement

    @property
    def belief(self) -> Snapshot | None:
        """The snapshot of the last decision."""
        return self._belief

    def _device_lost(self, device: str, why: str) -> None:
        """A device stopped answering a request (Requests' timeout)."""
        self.recovery.device_lost(device, why)

    def alive(self) -> list[str]:
        return self.beliefs.alive_names()

    # ------------------------------------------------------------------ messages

    def _on_message(self, sender: str, raw: dict[str, Any], due: float | None = None) -> None:
        """Every message for the controller, due at emulated time `due` (its arrival at the
        source): checked (`messages.for_controller`; a refused one is counted and logged,
        and changes nothing), then acted on by kind."""
        if self._over:
            return
        try:
            m = P.for_controller(raw, sender, self.bounds)
            if isinstance(m, P.Ack):
                self.requests.answered(m, sender, due)
            else:
                self._on_report(m, due)
        except P.ProtocolError as e:
            self.refusals.refuse(sender if self.bounds.known(sender) else "?", P.kind_of(raw), str(e),
                                 self.loop.time())

    def _on_report(self, m: Any, due: float | None = None) -> None:
        if isinstance(m, P.Pressure | P.LinkChange | P.Error) and (
                m.device not in self.devices or (isinstance(m, P.LinkChange) and m.peer not in self.devices)):
            raise P.ProtocolError(f"{m.KIND!r} about a device that has not joined")
        if isinstance(m, P.Pressure) or (isinstance(m, P.LinkChange) and m.rate > 0):
            # what a decision sees: taken at its emulated arrival, in order (a link
            # down to the source cuts a device off at once: recovery's, not a view's)
            self._in_order(due, partial(_REPORTS[type(m)], self, m))
            return
        if isinstance(m, P.Error) and m.kind == "oom" and due is not None:
            self.timeline.reach(due)  # the attempt the controller waits for fails as of then
        if isinstance(m, P.Down) and self._settling and due is not None and due > self.timeline.now():
            # the host got here before the controller acted as of its instant (a token's
            # start, where it may re-plan): as on the virtual clock, that comes first
            self._held_downs.append((due, m))
            return
        _REPORTS[type(m)](self, m)

    def _release_downs(self) -> None:
        """After settling: the notices held back are taken in at their due time, at the
        controller's first wait from then on (at once if they are due already), as on the
        virtual clock: not before it acts as of its instant, never held while it waits."""
        held, self._held_downs = self._held_downs, []
        for due, m in held:
            self.loop.call_at(due, self._down_unless_over, m)

    def _down_unless_over(self, m: P.Down) -> None:
        if not self._over:
            self._down(m)

    def _in_order(self, due: float | None, apply: Callable[[], None]) -> None:
        """Apply a report (or a telemetry round) due at emulated time `due` once the
        controller's instant has reached it, after those due before it. On the virtual
        clock everything arrives at its due time: applied at once, as it comes."""
        if not self.timeline.virtual and due is not None and due < self._settled:
            self.stats.missed_reports += 1  # the controller has acted as of later without it
        if self.timeline.virtual or due is None or due <= self.timeline.now():
            self._take_reports()
            apply()
        else:
            heapq.heappush(self._later, (due, next(self._n), apply))

    def _take_reports(self) -> None:
        """Apply the reports due by the controller's instant, in due order."""
        now = self.timeline.now()
        while self._later and self._later[0][0] <= now:
            heapq.heappop(self._later)[2]()

    # ---- reports, by kind (the dispatch table `_REPORTS` below)

    def _logits(self, m: P.Logits) -> None:
        fut = self._token_fut
        if fut is not None and not fut.done() and m.seq == self._seq:
            fut.set_result((m.logits, m.at))

    def _pressure(self, m: P.Pressure) -> None:
        self.signal(f"memory_pressure@{m.device}")
        self.beliefs.memory(m.device, m.memory, m.at)

    def _link_change(self, m: P.LinkChange) -> None:
        ends = frozenset((m.device, m.peer))
        if m.at < self._link_at.get(ends, -math.inf):
            return  # an older alarm (held by the very link it reports) arriving late
        self._link_at[ends] = m.at
        self.signal(f"link_change@{m.device}->{m.peer}")
        self.beliefs.link(m.device, m.peer, m.rate, m.latency)
        if self.source_name in ends:  # a link of the controller's own device
            (other,) = ends - {self.source_name}
            self.recovery.link_to_source(other, m.rate)

    def _down(self, m: P.Down) -> None:
        self.recovery.device_lost(m.device, "connection lost")

    def _join(self, m: P.Join) -> None:
        self.recovery.joined(m)

    def _error(self, m: P.Error) -> None:
        if m.kind == "oom":
            self.stats.oom += 1
            if m.memory is not None and m.at is not None:
                self.beliefs.memory(m.device, m.memory, m.at)
            self.rec.event(self.now(), self.k, "oom", m.device, f"layer={m.layer} bytes={m.bytes} {m.detail or ''}")
            fut = self._token_fut
            if fut is not None and not fut.done() and m.seq == self._seq:
                fut.set_exception(OutOfMemory(m.device, m.detail))
        else:  # the agent is in an unknown state: a lost device (recovered), as if it died
            self.recovery.device_lost(m.device, f"agent error: {m.detail}")

    def fault(self, why: str) -> None:
        """An agent or the transport failed in a way we cannot repair: stop the run."""
        if self._fault is None:
            self._fault = why
        self.interrupt(RunFailed(why))
        self.requests.fail_all(RunFailed(why))

    def interrupt(self, err: Exception) -> None:
        """The token attempt in flight (if any) fails with `err`."""
        if self._token_fut is not None and not self._token_fut.done():
            self._token_fut.set_exception(err)

    def signal(self, reason: str) -> None:
        """Re-plan before the next token (the first signal names the reason)."""
        self._urgent = self._urgent or reason

    def now(self) -> float:
        """Emulated seconds since the first token, at the controller's instant."""
        return self.timeline.now() - self.t0

    # ------------------------------------------------------------------ snapshots

    def seq_len(self) -> int:
        """Positions every cache holds before the token being produced."""
        return self.policy.seq_len(self.k)

    async def snapshot(self) -> Snapshot:
        """The view for a decision now. Oracle: the emulator's truth. Measured: the latest
        reports; a fresh round is requested and not waited for (it informs the next
        epoch), except when nothing has been heard yet."""
        n, interval = self.policy.horizon(self.k)
        if self.opt.telemetry == "oracle":
            snap = await self._oracle(n, interval)
        else:
            if not self.beliefs.ready:
                await self._telemetry_round(wait=True)
            elif self._tel_task is None or self._tel_task.done():
                self._tel_task = self.loop.create_task(self._telemetry_round())
            self._take_reports()
            snap = self.beliefs.snapshot(n, interval, self.placement)
        snap = snap.with_(devices=self.window.observe(self.k, snap.devices), frame_extra=self.opt.frame_extra,
                          migration=self.opt.migration)
        self._belief = snap
        return snap

    async def _oracle(self, n: int, interval: int) -> Snapshot:
        snap = await self.oracle(n, interval, self.placement)
        lost = {self.devices.index(d) for d, a in zip(self.devices, self.beliefs.alive, strict=True) if not a}
        if lost:  # the controller's own knowledge of departures
            snap = snap.with_(devices=tuple(replace(d, alive=False) if i in lost else d
                                            for i, d in enumerate(snap.devices)))
        return snap

    async def observe(self, k: int) -> None:
        """Watch the devices at token k (k < 0: before the run) for the planner's load
        window; decisions observe by themselves. Only with a window of several tokens: the
        view of a one-token window is the decision's own snapshot."""
        if self.opt.window == 1:
            return
        if self.opt.telemetry == "oracle":
            devices = (await self._oracle(0, 1)).devices
        elif self.beliefs.ready:  # what the reports say so far; no extra round
            self._take_reports()
            devices = self.beliefs.snapshot(0, 1, None).devices
        else:
            return
        self.window.observe(k, devices)

    async def _telemetry_round(self, wait: bool = False) -> None:
        """Ask every device for a report; the answers count from when the last was due
        (`wait`: the controller waits for them; otherwise the round runs beside it)."""
        replies, due = await self.requests.ask_at({d: partial(P.Telemetry, probe_bytes=self.opt.probe_bytes)
                                                   for d in self.alive()}, "telemetry", move=wait)

        def apply() -> None:
            for d, r in replies.items():
                if d in self.beliefs.names:
                    self.beliefs.telemetry(d, r.reply)
        self._in_order(due, apply)

    def _guess_ms(self, tokens: int, n: int) -> float:
        """The estimate under the last decision's view (no requests)."""
        snap = self._belief
        if snap is None or self.placement is None or len(snap.devices) != len(self.devices):
            return math.nan
        return LatencyModel(snap, tokens).token_time(self.placement, n) * 1e3

    async def predicted_ms(self, tokens: int, n: int) -> float:
        snap = self._belief
        if snap is None or self.placement is None:
            return math.nan
        if self.opt.telemetry == "oracle":
            snap = (await self.oracle(snap.seq_len, snap.interval, self.placement)).with_(
                frame_extra=self.opt.frame_extra)
        return LatencyModel(snap, tokens).token_time(self.placement, n) * 1e3

    # ------------------------------------------------------------------ placement

    async def deploy(self) -> None:
        """Initial placement: plan, load blocks from local weights, route."""
        snap = await self.snapshot()
        try:
            placement = await self.plan(snap, "initial")
        except Stop as e:
            raise self._stopped(e) from None
        await self.mover.load({b.name: self.devices[j] for b, j in placement.items()}, "deployment")
        await self.mover.route(placement)
        self.rec.placement(0, [(b.name, self.devices[j]) for b, j in placement.items()])

    def skip_deployment_host_time(self) -> float:
        """After `deploy`, on the real clock: the host's time for the deployment beyond its
        emulated instants (agents in fresh processes building their blocks from the weight
        file take seconds) is not the emulated system's, as the agents' start-up before
        `t0` is not. The run's start moves forward by it, so every later time in the result
        files and the first token's start are where the virtual clock has them, and the
        prefill's jobs are not late by it. Returns the seconds skipped (0 virtual)."""
        gap = self.timeline.catch_up()
        self.t0 += gap
        return gap

    async def plan(self, snap: Snapshot, reason: str) -> Placement:
        """Decide on `snap` under the policy; record the decision. It takes its modelled
        cost on the controller's device (`Policy.cost_s`), the same on both clocks: the
        plan is returned when that much emulated time has passed since the decision began.
        The host's own time for it is recorded only; on the real clock it is absorbed when
        it fits the cost (its wall time / K); a re-plan that does not (by more than
        `LATE_DECISION_SHARE` of its cost) is counted in `late_decisions`, with the emulated
        time it took beyond its cost (the deployment's is not: nothing runs meanwhile)."""
        s0 = self.timeline.now()
        w0 = time.perf_counter()  # decision time is the host's: wall clock, for the record only
        d = self.policy.decide(snap, reason)
        ms = (time.perf_counter() - w0) * 1e3
        cost = self.policy.cost_s(d)
        self.stats.decision_ms.append(ms)
        self.stats.replans += 1
        k = clock.time_scale(self.loop)
        if k is not None and reason != "initial" and cost > 0:
            self.stats.decision_scale = max(self.stats.decision_scale, ms / 1e3 / cost)
            over = ms / 1e3 / k - cost
            if over > LATE_DECISION_SHARE * cost:  # its host time did not fit its cost
                self.stats.late_decisions += 1
                self.stats.late_decision_s += over
        self.rec.event(s0 - self.t0, self.k, "replan", self.alg.name, d.describe(ms, cost))
        await clock.sleep_until(s0 + cost)
        self.timeline.reach(s0 + cost)
        return d.placement

    def _stopped(self, e: Stop) -> RunFailed:
        """The policy stops the run: record its event, if any, and fail."""
        if e.event is not None:
            self.rec.event(self.now(), self.k, e.event, self.alg.name, e.detail)
        return RunFailed(e.message, e.record)

    async def epoch(self, reason: str, urgent: bool = False) -> tuple[int, int]:
        """Re-plan and migrate; returns (migrations, bytes) applied. With pre-copy the moves
        start and switch at later token boundaries (`precopy`), except `urgent` ones (an
        out-of-memory repair needs the room now): those go by stop-and-copy."""
        snap = await self.snapshot()
        await self.hooks.on_epoch(self.k)
        new = await self.plan(snap, reason)
        assert self.placement is not None
        moves = self.placement.moves(new)
        if self.opt.migration == "pre_copy":
            if not urgent:
                await self.precopy.start(moves)
                return 0, 0
            await self.precopy.abandon("an urgent move goes by stop-and-copy")
        if not moves:
            return 0, 0
        return await self.mover.migrate(moves, self._belief)

    # ------------------------------------------------------------------ generation

    async def _attempt(self, tokens: list[int], pos: int, replay: bool = False,
                       predicted_ms: float = math.nan) -> tuple[torch.Tensor, float]:
        """One attempt: tokens in at the source; the last position's logits back, and the
        emulated time the source had them (the host's delay in handing them over to us,
        e.g. across processes, is not the system's)."""
        self._seq += 1
        if self._seq > self.bounds.max_seq:  # agents refuse attempts beyond the run's bounds
            raise RunFailed(f"{self._seq} attempts: more than a run of this scenario can need")
        fut: asyncio.Future[tuple[torch.Tensor, float | None]] = self.loop.create_future()
        self._token_fut = fut
        self.port.send(self.source_name, P.Gen(self._seq, tuple(tokens), pos).wire(), self.timeline.now())
        limit = self.opt.stall_min_s
        if math.isfinite(predicted_ms):
            limit = max(limit, self.opt.stall_factor * predicted_ms / 1e3)
        if replay:
            limit = max(limit, self.opt.request_timeout_s)
        try:
            logits, at = await asyncio.wait_for(fut, limit)
        except TimeoutError:
            self.timeline.reach(None)
            raise Stalled(f"token {self.k} took over {limit:g} s") from None
        finally:
            self._token_fut = None
        now = self.loop.time()
        # a stamp from another host's clock (or none) is not trusted: then it is now
        done = at if at is not None and now - 1.0 <= at <= now else now
        self.timeline.reach(done)
        return logits, done

    async def replay(self, n: int) -> None:
        """Run the first n positions of the token history through the pipeline again
        (rebuilds the caches of reloaded heads)."""
        await self._attempt((self.prompt + self.ids)[:n], 0, replay=True)

    async def abort(self) -> None:
        await self.requests.ask({d: partial(P.Abort, seq=self._seq) for d in self.alive()}, "abort")

    async def produce(self, k: int) -> dict[str, Any]:
        """Produce token k (k = 0 is the prefill); returns its tokens.csv row."""
        self.k = k
        try:
            return await self._produce(k)
        except Stop as e:  # the policy's verdict, from a decision or an emergency
            raise self._stopped(e) from None

    async def _produce(self, k: int) -> dict[str, Any]:
        if self._fault:
            raise RunFailed(self._fault)
        t_start = self.timeline.now()
        charge = TokenCharge()  # its latency below is measured from t_start: stalls included
        # take in the signals due before this token starts: on the real clock, once the
        # transport has carried them (`Port.settle`); those due later wait for the
        # controller's instant (`_in_order`)
        if self.timeline.virtual:
            await asyncio.sleep(0)
        else:
            settle_to = self.timeline.now()
            self._settling = True
            try:
                await self.port.settle(settle_to)
            finally:
                self._settling = False
                self._release_downs()
            self._settled = settle_to
        self._take_reports()
        await self.observe(k)
        if self.recovery.lost:
            await self._recover()
            charge.add(self.timeline.now() - t_start)
        if self.recovery.revive:
            await self.recovery.rejoin()
        urgent, self._urgent = self._urgent, None
        reason = self.policy.due(k, urgent)
        if reason is not None:
            s0 = self.timeline.now()
            if urgent:
                self.stats.emergencies += 1
            m, b = await self.epoch(reason)
            charge.add(self.timeline.now() - s0, m, b)
        if self.precopy.moves or self.precopy.owed:  # a token boundary: pre-copy stages advance, ready blocks switch
            s0 = self.timeline.now()
            m, b = await self.precopy.boundary()
            charge.add(self.timeline.now() - s0, m, b)
        if k == 0:
            tokens, pos = list(self.prompt), 0
        else:
            tokens, pos = [self.ids[-1]], len(self.prompt) + k - 1
        # the estimate is the watchdog's yardstick; with oracle telemetry in other processes
        # it costs a round of requests, so it is taken from the last decision's view here
        # and computed properly once the token is done (outside its measured latency)
        guess = self._guess_ms(len(tokens), pos + len(tokens))
        for _attempt in range(self.opt.max_attempts):
            if self.recovery.lost:  # lost while this token re-planned (with agents in processes,
                # a failure is heard a little later): repair first, not after a stalled attempt
                s0 = self.timeline.now()
                await self._recover()
                charge.add(self.timeline.now() - s0)
                guess = self._guess_ms(len(tokens), pos + len(tokens))
            try:
                logits, done = await self._attempt(tokens, pos, predicted_ms=guess)
                break
            except (OutOfMemory, Stalled, DeviceLost) as e:
                s0 = self.timeline.now()
                m, b = await self._emergency(e)
                charge.add(self.timeline.now() - s0, m, b)
                guess = self._guess_ms(len(tokens), pos + len(tokens))
        else:
            raise RunFailed(f"token {k} failed {self.opt.max_attempts} times in a row")
        latency = max(done, t_start) - t_start
        tok = next_token(logits)
        self.ids.append(tok)
        predicted = await self.predicted_ms(len(tokens), pos + len(tokens))
        ref = self.ref_ids[k] if k < len(self.ref_ids) else -1
        if k < len(self.ref_logits):
            diff = float((logits.float() - self.ref_logits[k]).abs().max())
            self.stats.logit_diff = max(self.stats.logit_diff, diff)
        if tok != ref:
            self.stats.mismatches += 1
        return {
            "token": k, "t_start_s": round(t_start - self.t0, 9), "latency_ms": round(latency * 1e3, 6),
            "predicted_ms": round(predicted, 6), "stall_ms": round(charge.stall_s * 1e3, 6),
            "migrations": charge.migrations, "migrated_bytes": charge.migrated_bytes, "token_id": tok, "ref_token_id": ref,
            "phase": "prefill" if k == 0 else "decode",
        }

    async def _emergency(self, e: Exception) -> tuple[int, int]:
        """An attempt failed: abort it everywhere, repair, and let the caller retry."""
        if isinstance(e, DeviceLost):
            await self._recover()
            return 0, 0
        if isinstance(e, Stalled):
            self.stats.stalls += 1
            self.rec.event(self.now(), self.k, "stall", self.source_name, str(e))
        await self.abort()
        if self.recovery.lost:
            await self._recover()
            return 0, 0
        if isinstance(e, OutOfMemory):
            kind, devices, detail = "oom", [e.device], ""
        else:
            kind, devices, detail = "stall", [], str(e)
        reason = self.policy.emergency(kind, self.k, devices, detail)
        self.stats.emergencies += 1
        m, b = await self.epoch(reason, urgent=kind == "oom")
        self.policy.repaired(kind, self.k, m, devices)
        return m, b

    async def _recover(self) -> None:
        """Recover lost devices; pre-copies in flight roll back first (the blocks they move
        serve from their sources, which recovery accounts for)."""
        await self.precopy.abandon("a device is lost")
        await self.recovery.recover()

    async def finish(self) -> None:
        """After the last token: pre-copies still in flight are given up (their
        destinations free what they hold)."""
        await self.precopy.abandon("the run ended", unfinished=True)
        await self.precopy.settle()

    async def stop(self) -> None:
        """Cancel background telemetry; answer nothing more (the agents stop after us: the
        connections they close are the end of the run, not failures)."""
        self._over = True
        task, self._tel_task = self._tel_task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.requests.cancel()


# the controller's one dispatch table: every report it acts on, by its record type (answers
# to requests go to `Requests`); with the device's `_HANDLERS` it covers every kind
_REPORTS: dict[type[P.Message], Callable[[Controller, Any], None]] = {
    P.Logits: Controller._logits, P.Pressure: Controller._pressure, P.LinkChange: Controller._link_change,
    P.Down: Controller._down, P.Join: Controller._join, P.Error: Controller._error,
}
assert set(_REPORTS) | {P.Ack} == {P.TABLE[k] for k in P.TO_CONTROLLER}
