"""Controller agent: runs on the source device, drives generation, re-plans, migrates,
recovers from failures.

It reaches the cluster only through a `Port` (messages sent from the source device, and the
messages that arrive there for it), so the same code drives in-process agents and agents in
other processes. Per token it asks the source device to embed and run the pipeline, takes
the logits back, picks the token (greedy) and compares it with the monolithic reference.

At every decision epoch (every `interval_tokens` tokens, for algorithms that re-plan) and at
once on an emergency it builds a snapshot (oracle: the emulator's truth; measured: the
`Beliefs` built from reports), calls the placement algorithm and applies the moves with the
two-phase migration: reserve at the destination, send the snapshot
(weights + cache) over the emulated link, install and acknowledge, switch routing
everywhere, free at the source. Emergencies: a refused cache append (oom), a device gone
(its connection broke, or it stopped answering), a token that stalls (e.g. on a link that
went down). A lost device's blocks are loaded again elsewhere from local weights and their
caches rebuilt by replaying the token history through the pipeline, so the run continues
and its tokens still equal the reference.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from ..model.spec import ModelSpec
from ..placement.plugins import PluginFailed
from ..placement.problem import (
    Infeasible,
    LatencyModel,
    Placement,
    Snapshot,
    epoch_objective,
)
from ..placement.protocol import Algorithm  # re-exported: the protocol used to live here
from ..refusals import Refusals
from ..scenario import Scenario
from . import protocol as P
from .beliefs import Beliefs
from .errors import DeviceLost, OutOfMemory, RunFailed, Stalled
from .migration import Migrations
from .recovery import Recovery

__all__ = ["Algorithm", "Controller", "Options", "RunFailed", "OutOfMemory", "DeviceLost", "Stalled"]

log = logging.getLogger(__name__)


class Port(Protocol):
    """The controller's view of the transport: it runs on the source device."""

    source: str

    def send(self, dst: str, msg: dict[str, Any]) -> None: ...

    def attach(self, handler: Callable[[str, dict[str, Any]], None]) -> None: ...


class Recorder(Protocol):
    def token(self, row: dict[str, Any]) -> None: ...
    def event(self, t_s: float, token: int, kind: str, subject: str, detail: str) -> None: ...
    def placement(self, token: int, changes: Sequence[tuple[str, str]]) -> None: ...


class RunHooks(Protocol):
    async def on_epoch(self, k: int) -> None: ...


Oracle = Callable[[int, int, "Placement | None"], Awaitable[Snapshot]]


@dataclass
class Stats:
    """Counters the controller keeps for the summary."""

    migrations: int = 0
    migrated_bytes: int = 0
    failed_migrations: int = 0
    refused_migrations: int = 0
    replans: int = 0
    emergencies: int = 0
    oom: int = 0
    stalls: int = 0
    decision_ms: list[float] = field(default_factory=list)
    recover_ms: list[float] = field(default_factory=list)
    logit_diff: float = 0.0
    mismatches: int = 0


@dataclass
class Options:
    interval: int
    telemetry: str  # oracle | measured
    probe_bytes: int = 2048
    request_timeout_s: float = 30.0  # emulated seconds a device may take to answer
    stall_factor: float = 20.0  # an attempt longer than this x predicted has stalled...
    stall_min_s: float = 1.0  # ... and longer than this
    max_attempts: int = 8  # per token, before the run fails
    frame_extra: int = 0  # bytes the transport adds to every frame (priced by the estimate)


class Controller(Migrations, Recovery):
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
        self.loop = asyncio.get_running_loop()
        self.placement: Placement | None = None
        self.route_version = 0
        self.stats = Stats()
        self._rid = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        self._asked: dict[int, tuple[str, frozenset[str]]] = {}  # rid -> (request, who may answer)
        # every message that reaches us is checked against the run's bounds first
        self.bounds = P.Bounds.for_run(scenario, options.max_attempts)
        self.refusals = Refusals("controller", log)
        self._seq = 0
        self._token_fut: asyncio.Future[tuple[torch.Tensor, float | None]] | None = None
        self._fault: str | None = None
        self._lost: list[str] = []  # devices gone and not yet recovered from
        self._unreachable: set[str] = set()  # alive, but their link to the source is down
        self._revive: list[str] = []  # unreachable devices whose link came back
        self._link_at: dict[frozenset[str], float] = {}  # time of the latest alarm per device pair
        self.t0 = 0.0
        self.k = 0  # token being produced
        self.ids: list[int] = []
        self._belief: Snapshot | None = None  # the snapshot of the last decision
        self._tel_task: asyncio.Task[None] | None = None
        self._urgent: str | None = None  # a signal asks for a re-plan before the next token
        self._stopped = False  # the run is over: agents going away now are not failures

    @property
    def devices(self) -> list[str]:
        return self.beliefs.names

    def alive(self) -> list[str]:
        return [d for d, a in zip(self.beliefs.names, self.beliefs.alive, strict=True) if a]

    # ------------------------------------------------------------------ messages

    def _on_message(self, sender: str, raw: dict[str, Any]) -> None:
        """Every message for the controller: checked (`protocol.for_controller`; a refused
        one is counted and logged, and changes nothing), then acted on by kind."""
        if self._stopped:
            return
        try:
            m = P.for_controller(raw, sender, self.bounds)
            if m.KIND == P.ACK:
                self._on_ack(sender, m)  # type: ignore[arg-type]
            else:
                self._on_report(sender, m)
        except P.ProtocolError as e:
            self.refusals.refuse(sender if self.bounds.known(sender) else "?", P.kind_of(raw), str(e),
                                 self.loop.time())

    def _on_ack(self, sender: str, m: P.Ack) -> None:
        """An answer: to a request we are waiting for, from a device it was asked of, with
        what that request's answer carries."""
        asked = self._asked.get(m.rid)
        if asked is None:
            raise P.ProtocolError(f"'ack' from {sender} to no request of ours (rid {m.rid})")
        request, who = asked
        if sender not in who:
            raise P.ProtocolError(f"'ack' to {request!r} from {sender}, which was not asked")
        m.answers(request)
        del self._asked[m.rid]
        entry = self._pending.pop(m.rid, None)
        if entry is not None and not entry[1].done():
            entry[1].set_result(m)  # type: ignore[arg-type]

    def _on_report(self, sender: str, m: Any) -> None:
        t = m.KIND
        if t in (P.PRESSURE, P.LINK_CHANGE, P.ERROR) and (
                m.device not in self.devices or (t == P.LINK_CHANGE and m.peer not in self.devices)):
            raise P.ProtocolError(f"{t!r} about a device that has not joined")
        if t == P.LOGITS:
            fut = self._token_fut
            if fut is not None and not fut.done() and m["seq"] == self._seq:
                fut.set_result((m["logits"], m.get("at")))
        elif t == P.PRESSURE:
            self._urgent = self._urgent or f"memory_pressure@{m['device']}"
            self.beliefs.memory(m["device"], m["memory"], m["at"])
        elif t == P.LINK_CHANGE:
            ends = frozenset((m["device"], m["peer"]))
            if m["at"] < self._link_at.get(ends, -math.inf):
                return  # an older alarm (held by the very link it reports) arriving late
            self._link_at[ends] = m["at"]
            self._urgent = self._urgent or f"link_change@{m['device']}->{m['peer']}"
            self.beliefs.link(m["device"], m["peer"], m["rate"], m["latency"])
            if self.source_name in ends:  # a link of the controller's own device
                (other,) = ends - {self.source_name}
                if m["rate"] <= 0:  # cut off: no control message gets through either
                    self._unreachable.add(other)
                    self._revive = [d for d in self._revive if d != other]
                    self.device_lost(other, "unreachable: its link to the source is down")
                elif other in self._unreachable and other not in self._revive:
                    self._revive.append(other)
        elif t == P.DOWN:
            self.device_lost(m["device"], "connection lost")
        elif t == P.JOIN:
            self._joined(m)
        elif t == P.ERROR:
            if m["kind"] == "oom":
                self.stats.oom += 1
                self.beliefs.memory(m["device"], m["memory"], m["at"])
                self.rec.event(self.now(), self.k, "oom", m["device"],
                               f"layer={m.get('layer')} bytes={m.get('bytes')} {m.get('detail', '')}")
                fut = self._token_fut
                if fut is not None and not fut.done() and m.get("seq") == self._seq:
                    fut.set_exception(OutOfMemory(m))
            else:  # the agent is in an unknown state: a lost device (recovered), as if it died
                self.device_lost(m.device, f"agent error: {m.detail}")

    def fault(self, why: str) -> None:
        """An agent or the transport failed in a way we cannot repair: stop the run."""
        if self._fault is None:
            self._fault = why
        for fut in [self._token_fut, *(f for _, f in self._pending.values())]:
            if fut is not None and not fut.done():
                fut.set_exception(RunFailed(why))

    def _request(self, dev: str, msg: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        rid = next(self._rid)
        fut = self.loop.create_future()
        self._pending[rid] = (dev, fut)
        # a migration is answered by its destination (or by its source, when it cannot send)
        self._asked[rid] = (msg["t"], frozenset((dev, msg["to"])) if msg["t"] == P.MIGRATE else frozenset((dev,)))
        fut.add_done_callback(lambda _: self._asked.pop(rid, None))
        self.port.send(dev, {**msg, "rid": rid})
        return fut

    async def _ask(self, requests: dict[str, dict[str, Any]], what: str,
                   timeout: float | None = None) -> dict[str, dict[str, Any]]:
        """Send one request per device and wait for the answers. A device that does not
        answer in time is unreachable: it is treated as lost and left out of the result."""
        futs = {d: self._request(d, m) for d, m in requests.items()}
        if not futs:
            return {}
        _, pending = await asyncio.wait(futs.values(), timeout=timeout or self.opt.request_timeout_s)
        out = {}
        for d, f in futs.items():
            if f in pending:
                f.cancel()
                self.device_lost(d, f"no answer to {what} within {timeout or self.opt.request_timeout_s:g} s")
            elif f.exception() is None:
                out[d] = f.result()
            elif isinstance(f.exception(), RunFailed):
                raise f.exception()  # type: ignore[misc]
        return out

    def now(self) -> float:
        return self.loop.time() - self.t0

    # ------------------------------------------------------------------ snapshots

    def seq_len(self) -> int:
        """Positions every cache holds before the token being produced."""
        return len(self.prompt) + self.k - 1 if self.k > 0 else 0

    async def snapshot(self) -> Snapshot:
        """The view for a decision now. Oracle: the emulator's truth. Measured: the latest
        reports; a fresh round is requested and not waited for (it informs the next
        epoch), except when nothing has been heard yet."""
        n, interval = self.seq_len(), self.opt.interval
        if self.k == 0:
            n, interval = 0, len(self.prompt) + self.opt.interval
        if self.opt.telemetry == "oracle":
            snap = await self.oracle(n, interval, self.placement)
            lost = {self.devices.index(d) for d, a in zip(self.devices, self.beliefs.alive, strict=True) if not a}
            if lost:  # the controller's own knowledge of departures
                snap = snap.with_(devices=tuple(replace(d, alive=False) if i in lost else d
                                                for i, d in enumerate(snap.devices)))
        else:
            if not self.beliefs.ready:
                await self._telemetry_round()
            elif self._tel_task is None or self._tel_task.done():
                self._tel_task = self.loop.create_task(self._telemetry_round())
            snap = self.beliefs.snapshot(n, interval, self.placement)
        snap = snap.with_(frame_extra=self.opt.frame_extra)
        self._belief = snap
        return snap

    async def _telemetry_round(self) -> None:
        replies = await self._ask({d: {"t": P.TELEMETRY, "probe_bytes": self.opt.probe_bytes}
                                   for d in self.alive()}, "telemetry")
        for d, r in replies.items():
            self.beliefs.telemetry(d, r)

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
        placement = self._plan(snap, "initial")
        await self._load({b.name: self.devices[j] for b, j in placement.items()}, "deployment")
        await self._route(placement)
        self.rec.placement(0, [(b.name, self.devices[j]) for b, j in placement.items()])

    def _plan(self, snap: Snapshot, reason: str) -> Placement:
        w0 = time.perf_counter()
        try:
            try:
                new = self.alg.place(snap)
            except Infeasible:
                # no placement keeps every device under its soft limit: use the headroom
                snap = snap.hard()
                new = self.alg.place(snap)
                reason += ",hard_limits"
        except Infeasible as e:
            self.rec.event(self.now(), self.k, "infeasible", self.alg.name, str(e))
            raise RunFailed(f"infeasible: {e}") from None
        except PluginFailed as e:  # a plug-in raised or answered an invalid placement
            self.rec.event(self.now(), self.k, "algorithm_error", self.alg.name, str(e))
            raise RunFailed(str(e), e.record()) from None
        except (ValueError, RuntimeError) as e:  # e.g. an exact solver refusing or timing out
            self.rec.event(self.now(), self.k, "algorithm_error", self.alg.name, str(e))
            raise RunFailed(f"{self.alg.name} failed: {e}") from None
        ms = (time.perf_counter() - w0) * 1e3
        self.stats.decision_ms.append(ms)
        self.stats.replans += 1
        gain = ""
        if snap.current is not None:
            lm = LatencyModel(snap)
            g = epoch_objective(snap, snap.current, lm) - epoch_objective(snap, new, lm)
            gain = f" predicted_gain_ms={g * 1e3:.3f}" if math.isfinite(g) else ""
        moves = len(snap.current.moves(new)) if snap.current is not None else len(self.model.blocks)
        self.rec.event(self.now(), self.k, "replan", self.alg.name,
                       f"reason={reason} decision_ms={ms:.3f} moves={moves}{gain}")
        return new

    async def epoch(self, reason: str) -> tuple[int, int]:
        """Re-plan and migrate; returns (migrations, bytes) applied."""
        snap = await self.snapshot()
        await self.hooks.on_epoch(self.k)
        new = self._plan(snap, reason)
        assert self.placement is not None
        moves = self.placement.moves(new)
        if not moves:
            return 0, 0
        return await self.migrate(moves)

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
        self.port.send(self.source_name, {"t": P.GEN, "seq": self._seq, "tokens": tokens, "pos": pos})
        limit = self.opt.stall_min_s
        if math.isfinite(predicted_ms):
            limit = max(limit, self.opt.stall_factor * predicted_ms / 1e3)
        if replay:
            limit = max(limit, self.opt.request_timeout_s)
        try:
            logits, at = await asyncio.wait_for(fut, limit)
        except TimeoutError:
            raise Stalled(f"token {self.k} took over {limit:g} s") from None
        finally:
            self._token_fut = None
        now = self.loop.time()
        # a stamp from another host's clock (or none) is not trusted: then it is now
        return logits, at if at is not None and now - 1.0 <= at <= now else now

    async def _abort(self) -> None:
        await self._ask({d: {"t": P.ABORT, "seq": self._seq} for d in self.alive()}, "abort")

    async def produce(self, k: int) -> dict[str, Any]:
        """Produce token k (k = 0 is the prefill); returns its tokens.csv row."""
        self.k = k
        if self._fault:
            raise RunFailed(self._fault)
        t_start = self.loop.time()
        stall = 0.0
        migrations = mbytes = 0
        await asyncio.sleep(0)  # take in the signals that arrived before this token starts
        if self._lost:
            await self._recover()
            stall += self.loop.time() - t_start
        if self._revive:
            await self._rejoin()
        urgent, self._urgent = self._urgent, None
        if k > 0 and self.alg.dynamic and (k % self.opt.interval == 0 or urgent):
            s0 = self.loop.time()
            if urgent:
                self.stats.emergencies += 1
            m, b = await self.epoch(f"emergency:{urgent}" if urgent else "interval")
            migrations, mbytes = migrations + m, mbytes + b
            stall += self.loop.time() - s0
        if k == 0:
            tokens, pos = list(self.prompt), 0
        else:
            tokens, pos = [self.ids[-1]], len(self.prompt) + k - 1
        # the estimate is the watchdog's yardstick; with oracle telemetry in other processes
        # it costs a round of requests, so it is taken from the last decision's view here
        # and computed properly once the token is done (outside its measured latency)
        guess = self._guess_ms(len(tokens), pos + len(tokens))
        for _attempt in range(self.opt.max_attempts):
            if self._lost:  # lost while this token re-planned (with agents in processes, a
                # failure is heard a little later): repair first, not after a stalled attempt
                s0 = self.loop.time()
                await self._recover()
                stall += self.loop.time() - s0
                guess = self._guess_ms(len(tokens), pos + len(tokens))
            try:
                logits, done = await self._attempt(tokens, pos, predicted_ms=guess)
                break
            except (OutOfMemory, Stalled, DeviceLost) as e:
                s0 = self.loop.time()
                m, b = await self._emergency(e)
                migrations, mbytes = migrations + m, mbytes + b
                stall += self.loop.time() - s0
                guess = self._guess_ms(len(tokens), pos + len(tokens))
        else:
            raise RunFailed(f"token {k} failed {self.opt.max_attempts} times in a row")
        latency = max(done, t_start) - t_start
        tok = int(logits.argmax())
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
            "predicted_ms": round(predicted, 6), "stall_ms": round(stall * 1e3, 6),
            "migrations": migrations, "migrated_bytes": mbytes, "token_id": tok, "ref_token_id": ref,
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
        await self._abort()
        if self._lost:
            await self._recover()
            return 0, 0
        if not self.alg.dynamic:
            if isinstance(e, OutOfMemory):
                raise RunFailed(f"out of memory on {e.msg['device']} at token {self.k} "
                                f"({self.alg.name} does not re-plan)") from None
            raise RunFailed(f"{e} and {self.alg.name} does not re-plan") from None
        self.stats.emergencies += 1
        what = f"oom@{e.msg['device']}" if isinstance(e, OutOfMemory) else "stall"
        m, b = await self.epoch(f"emergency:{what}")
        if m == 0 and isinstance(e, OutOfMemory):
            raise RunFailed(f"out of memory on {e.msg['device']} at token {self.k} and "
                            "re-planning moved nothing") from None
        return m, b

    async def stop(self) -> None:
        """Cancel background telemetry; answer nothing more (the agents stop after us: the
        connections they close are the end of the run, not failures)."""
        self._stopped = True
        task, self._tel_task = self._tel_task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for _, fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
