"""Controller agent: runs on the source device, drives generation, re-plans, migrates,
recovers from failures.

It reaches the cluster only through a `Port` (messages sent from the source device, and the
messages that arrive there for it), so the same code drives in-process agents and agents in
other processes. Per token it asks the source device to embed and run the pipeline, takes
the logits back, picks the token (greedy) and compares it with the monolithic reference.

At every decision epoch (every `interval_tokens` tokens, for algorithms that re-plan) and at
once on an emergency it builds a snapshot (oracle: the emulator's truth; measured: the
`Beliefs` built from reports), calls the placement algorithm and applies the moves with the
two-phase migration of DESIGN.md section 5: reserve at the destination, send the snapshot
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
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..model import cost
from ..model.spec import Block, ModelSpec
from ..placement.problem import (
    Infeasible,
    LatencyModel,
    Placement,
    Snapshot,
    block_index,
    epoch_objective,
    migration_delay,
)
from ..scenario import Scenario
from . import protocol as P
from .beliefs import Beliefs

log = logging.getLogger(__name__)


class RunFailed(Exception):
    """The run cannot go on; the message says why (recorded as `failed: <message>`)."""


class OutOfMemory(Exception):
    def __init__(self, msg: dict[str, Any]) -> None:
        self.msg = msg
        super().__init__(msg.get("detail", "out of memory"))


class DeviceLost(Exception):
    def __init__(self, devices: Sequence[str], why: str) -> None:
        self.devices, self.why = list(devices), why
        super().__init__(f"{', '.join(devices)}: {why}")


class Stalled(Exception):
    """A token attempt took far longer than predicted (e.g. a link went down)."""


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


class Algorithm(Protocol):
    name: str
    dynamic: bool

    def place(self, snap: Snapshot) -> Placement: ...


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


class Controller:
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
        self._seq = 0
        self._token_fut: asyncio.Future[torch.Tensor] | None = None
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

    @property
    def devices(self) -> list[str]:
        return self.beliefs.names

    def alive(self) -> list[str]:
        return [d for d, a in zip(self.beliefs.names, self.beliefs.alive, strict=True) if a]

    # ------------------------------------------------------------------ messages

    def _on_message(self, sender: str, m: dict[str, Any]) -> None:
        t = m["t"]
        if t == P.ACK:
            entry = self._pending.pop(m["rid"], None)
            if entry is not None and not entry[1].done():
                entry[1].set_result(m)
        elif t == P.LOGITS:
            fut = self._token_fut
            if fut is not None and not fut.done() and m["seq"] == self._seq:
                fut.set_result(m["logits"])
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
            else:
                self.fault(f"{m['device']}: {m.get('detail')}")
        else:
            raise P.ProtocolError(f"controller got unexpected message {t!r}")

    def fault(self, why: str) -> None:
        """An agent or the transport failed in a way we cannot repair: stop the run."""
        if self._fault is None:
            self._fault = why
        for fut in [self._token_fut, *(f for _, f in self._pending.values())]:
            if fut is not None and not fut.done():
                fut.set_exception(RunFailed(why))

    def device_lost(self, device: str, why: str) -> None:
        """A device is gone (its connection broke, it stopped answering): everything that
        waits on it fails now; recovery happens before the next attempt."""
        if device not in self.devices or device in self._lost or not self.beliefs.alive[self.beliefs.index(device)]:
            return
        if device == self.source_name:
            self.fault(f"the source device {device} is gone ({why})")
            return
        self._lost.append(device)
        self.beliefs.lost(device)
        self.rec.event(self.now(), self.k, "device_failed", device, why)
        err = DeviceLost([device], why)
        if self._token_fut is not None and not self._token_fut.done():
            self._token_fut.set_exception(err)
        for rid, (dev, fut) in list(self._pending.items()):
            if dev == device and not fut.done():
                fut.set_exception(err)
                self._pending.pop(rid, None)

    def _request(self, dev: str, msg: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        rid = next(self._rid)
        fut = self.loop.create_future()
        self._pending[rid] = (dev, fut)
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
                snap = snap.with_(devices=tuple(
                    d if i not in lost else type(d)(d.name, d.flops, d.capacity, d.host_blocks, False, d.hard_capacity)
                    for i, d in enumerate(snap.devices)))
        else:
            if not self.beliefs.ready:
                await self._telemetry_round()
            elif self._tel_task is None or self._tel_task.done():
                self._tel_task = self.loop.create_task(self._telemetry_round())
            snap = self.beliefs.snapshot(n, interval, self.placement)
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
            snap = await self.oracle(snap.seq_len, snap.interval, self.placement)
        return LatencyModel(snap, tokens).token_time(self.placement, n) * 1e3

    # ------------------------------------------------------------------ placement

    async def deploy(self) -> None:
        """Initial placement: plan, load blocks from local weights, route."""
        snap = await self.snapshot()
        placement = self._plan(snap, "initial")
        await self._load({b.name: self.devices[j] for b, j in placement.items()}, "deployment")
        await self._route(placement)
        self.rec.placement(0, [(b.name, self.devices[j]) for b, j in placement.items()])

    async def _load(self, where: dict[str, str], what: str) -> None:
        by_dev: dict[str, list[str]] = {}
        for block, dev in where.items():
            by_dev.setdefault(dev, []).append(block)
        replies = await self._ask({d: {"t": P.LOAD, "blocks": names} for d, names in by_dev.items()}, what)
        for d in by_dev:
            r = replies.get(d)
            if r is None or not r["ok"]:
                detail = "; ".join(f"{k}: {v}" for k, v in r["refused"].items()) if r else "no answer"
                self.rec.event(self.now(), self.k, "infeasible", d, detail)
                raise RunFailed(f"infeasible: {d} refused blocks at {what} ({detail})")

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

    async def _route(self, placement: Placement) -> None:
        self.route_version += 1
        msg = {"t": P.ROUTE, "version": self.route_version, "devices": list(self.devices),
               "assign": list(placement.assign)}
        await self._ask({d: msg for d in self.alive()}, "routing")
        self.placement = placement

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

    async def migrate(self, moves: list[tuple[Block, int, int]]) -> tuple[int, int]:
        assert self.placement is not None
        n = self.seq_len()
        names = self.devices
        sizes = {b.name: cost.block_bytes(self.model, b, n) for b, _, _ in moves}
        # phase 1: reserve memory at every destination
        by_dst: dict[str, dict[str, int]] = {}
        for b, _, c in moves:
            by_dst.setdefault(names[c], {})[b.name] = sizes[b.name]
        acks = await self._ask({d: {"t": P.RESERVE, "blocks": bl} for d, bl in by_dst.items()}, "reservation")
        reserved = {name for a in acks.values() for name in a["reserved"]}
        go = []
        down = [] if self._belief is None else [
            (b, a, c) for b, a, c in moves if self.beliefs.rate[a, c] <= 0 and b.name in reserved]
        for b, a, c in down:
            self.stats.failed_migrations += 1
            self.rec.event(self.now(), self.k, "migration_failed", b.name,
                           f"from={names[a]} to={names[c]} bytes={sizes[b.name]} the link is down")
            reserved.discard(b.name)
            by_dst[names[c]].pop(b.name, None)
        if down:
            await self._ask({names[c]: {"t": P.CANCEL, "blocks": [b.name]} for b, _, c in down
                             if names[c] in self.alive()}, "cancel")
        for b, a, c in moves:
            if (b, a, c) in down:
                continue
            if b.name in reserved:
                go.append((b, a, c))
            else:
                self.stats.refused_migrations += 1
                self.rec.event(self.now(), self.k, "migration_refused", b.name,
                               f"from={names[a]} to={names[c]} bytes={sizes[b.name]} (no room at destination)")
        # phase 2: snapshots over the links; the destination acknowledges the install
        starts = {b.name: self.loop.time() for b, _, _ in go}
        futs = [self._request(names[a], {"t": P.MIGRATE, "block": b.name, "to": names[c]}) for b, a, c in go]
        if futs:
            await asyncio.wait(futs, timeout=self._migration_timeout(go, n))
        assign = list(self.placement.assign)
        count = nbytes = 0
        failed: dict[str, list[str]] = {}
        for (b, a, c), fut in zip(go, futs, strict=True):
            r = fut.result() if fut.done() and not fut.cancelled() and fut.exception() is None else None
            if not fut.done():
                fut.cancel()
            if r is not None and r.get("ok"):
                assign[block_index(self.model)[b.name]] = c
                count += 1
                nbytes += sizes[b.name]
                ms = (self.loop.time() - starts[b.name]) * 1e3
                self.rec.event(self.now(), self.k, "migration", b.name,
                               f"from={names[a]} to={names[c]} bytes={sizes[b.name]} ms={ms:.3f}")
            else:
                self.stats.failed_migrations += 1
                why = r.get("detail") if r else "no acknowledgement"
                self.rec.event(self.now(), self.k, "migration_failed", b.name,
                               f"from={names[a]} to={names[c]} bytes={sizes[b.name]} {why}")
                failed.setdefault(names[c], []).append(b.name)
        alive = set(self.alive())
        cancel = {d: {"t": P.CANCEL, "blocks": bl} for d, bl in failed.items() if d in alive}
        await self._ask(cancel, "cancel")  # give back the reservations of moves that did not happen
        new = Placement(self.model, tuple(assign))
        changes = [(b.name, names[c]) for b, _, c in self.placement.moves(new)]
        # phase 3: switch routing everywhere; sources free what moved away
        await self._route(new)
        if changes:
            self.rec.placement(self.k, changes)
        self.stats.migrations += count
        self.stats.migrated_bytes += nbytes
        return count, nbytes

    def _migration_timeout(self, moves: list[tuple[Block, int, int]], n: int) -> float:
        """Generous against the believed link rates: a transfer that takes far longer has
        failed (e.g. its link went down)."""
        snap = self._belief
        if snap is None or not moves:
            return self.opt.request_timeout_s
        expected = migration_delay(snap.with_(seq_len=n), moves)
        if not math.isfinite(expected):
            return self.opt.request_timeout_s
        rtt = 2 * float(snap.latency.max())
        return min(self.opt.request_timeout_s, 5.0 + 4.0 * expected + 4.0 * rtt)

    # ------------------------------------------------------------------ failures

    def _joined(self, m: dict[str, Any]) -> None:
        name = m["device"]
        if name in self.devices:
            return
        links = self.scenario.network
        spec = next((e.join_links or {} for e in self.scenario.events
                     if e.action == "join_device" and e.join is not None and e.join.name == name), {})
        self.beliefs.add_device(name, m["host_blocks"], {o: spec.get(o, links.default) for o in self.devices})
        self.beliefs.memory(name, m["memory"], m["at"], float(m["flops"]))
        self.rec.event(self.now(), self.k, "device_joined", name, f"flops={m['flops']:g}")
        self._urgent = self._urgent or f"join@{name}"

    async def _rejoin(self) -> None:
        """Devices reachable again: their stale blocks are freed by the current routing (the
        controller gave those blocks to others) and they may host blocks again."""
        back, self._revive = self._revive, []
        for d in back:
            self._unreachable.discard(d)
            self.beliefs.revive(d)
        if self.placement is not None:
            msg = {"t": P.ROUTE, "version": self.route_version, "devices": list(self.devices),
                   "assign": list(self.placement.assign)}
            await self._ask(dict.fromkeys(back, msg), "routing")
        for d in back:
            self.rec.event(self.now(), self.k, "device_rejoined", d, "reachable again; stale blocks freed")

    async def _recover(self) -> None:
        """Re-place the blocks of lost devices, load them from local weights, and rebuild
        their caches by replaying the token history through the pipeline."""
        lost, self._lost = self._lost, []
        t0 = self.loop.time()
        assert self.placement is not None
        if not self.alg.dynamic:
            raise RunFailed(f"{', '.join(lost)} failed and {self.alg.name} does not re-plan")
        await self._abort()
        snap = await self.snapshot()
        self.stats.emergencies += 1
        new = self._plan(snap, f"emergency:lost@{','.join(lost)}")
        names = self.devices
        dead = {self.devices.index(d) for d in lost}
        orphans = {b.name: names[c] for b, a, c in self.placement.moves(new) if a in dead}
        stranded = [b.name for b, j in new.items() if j in dead]
        if stranded:
            raise RunFailed(f"re-planning left blocks on lost devices: {stranded[:3]}")
        await self._load(orphans, "recovery")
        assign = list(self.placement.assign)
        for name, dev in orphans.items():
            assign[block_index(self.model)[name]] = names.index(dev)
        self.placement = Placement(self.model, tuple(assign))
        self.rec.placement(self.k, sorted(orphans.items()))
        await self._route(self.placement)
        rest = [(b, a, c) for b, a, c in self.placement.moves(new)]
        if rest:
            await self.migrate(rest)
        # the reloaded heads have empty caches: replay the history (positions already held
        # elsewhere are rewritten with the same values)
        n = self.seq_len()
        if n > 0 and any(Block.parse(b).kind == "head" for b in orphans):
            await self._attempt((self.prompt + self.ids)[:n], 0, replay=True)
        ms = (self.loop.time() - t0) * 1e3
        self.stats.recover_ms.append(ms)
        self.rec.event(self.now(), self.k, "recovered", ",".join(lost),
                       f"reloaded={len(orphans)} replayed_positions={n} ms={ms:.3f}")

    # ------------------------------------------------------------------ generation

    async def _attempt(self, tokens: list[int], pos: int, replay: bool = False,
                       predicted_ms: float = math.nan) -> torch.Tensor:
        """One attempt: tokens in at the source, the last position's logits back."""
        self._seq += 1
        fut: asyncio.Future[torch.Tensor] = self.loop.create_future()
        self._token_fut = fut
        self.port.send(self.source_name, {"t": P.GEN, "seq": self._seq, "tokens": tokens, "pos": pos})
        limit = self.opt.stall_min_s
        if math.isfinite(predicted_ms):
            limit = max(limit, self.opt.stall_factor * predicted_ms / 1e3)
        if replay:
            limit = max(limit, self.opt.request_timeout_s)
        try:
            return await asyncio.wait_for(fut, limit)
        except TimeoutError:
            raise Stalled(f"token {self.k} took over {limit:g} s") from None
        finally:
            self._token_fut = None

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
            try:
                logits = await self._attempt(tokens, pos, predicted_ms=guess)
                break
            except (OutOfMemory, Stalled, DeviceLost) as e:
                s0 = self.loop.time()
                m, b = await self._emergency(e)
                migrations, mbytes = migrations + m, mbytes + b
                stall += self.loop.time() - s0
                guess = self._guess_ms(len(tokens), pos + len(tokens))
        else:
            raise RunFailed(f"token {k} failed {self.opt.max_attempts} times in a row")
        latency = self.loop.time() - t_start
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
        """Cancel background telemetry; answer nothing more."""
        task, self._tel_task = self._tel_task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for _, fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
