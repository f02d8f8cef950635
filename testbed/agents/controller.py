"""Controller agent: runs on the source device, drives generation, re-plans, migrates.

It embeds tokens and runs the LM head on the source device (its compute unit), sends the
hidden state into the pipeline and waits for it to come back; it compares every token with
the monolithic reference. At every decision epoch (every `interval_tokens` tokens, for
algorithms that re-plan) and at once on an emergency (a cache append refused at a device's
max) it builds a snapshot (oracle: the emulator's truth; measured: telemetry messages),
calls the placement algorithm and applies the moves with the two-phase migration of
DESIGN.md section 5: reserve at the destination, send the snapshot (weights + cache) over
the emulated link, install and acknowledge, switch routing everywhere, free at the source.
A refused reservation or a failed transfer leaves the block where it was and is recorded.

What happens is reported to a `Recorder` (results files); scenario events and
instrumentation are the runner's, reached through `RunHooks`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ..model import cost
from ..model.blocks import SourceBlock, WeightSource
from ..model.spec import Block, ModelSpec
from ..placement.problem import (
    DeviceState,
    Infeasible,
    LatencyModel,
    Placement,
    Snapshot,
    epoch_objective,
)
from ..scenario import Scenario
from . import protocol as P
from .device import DeviceAgent

log = logging.getLogger(__name__)


class RunFailed(Exception):
    """The run cannot go on; the message says why (recorded as `failed: <message>`)."""


class OutOfMemory(Exception):
    def __init__(self, msg: dict[str, Any]) -> None:
        self.msg = msg
        super().__init__(msg.get("detail", "out of memory"))


class Recorder(Protocol):
    def token(self, row: dict[str, Any]) -> None: ...
    def event(self, t_s: float, token: int, kind: str, subject: str, detail: str) -> None: ...
    def placement(self, token: int, changes: Sequence[tuple[str, str]]) -> None: ...


class RunHooks(Protocol):
    def before_token(self, k: int) -> None: ...
    def after_token(self, k: int) -> None: ...
    def on_epoch(self, k: int) -> None: ...


class Algorithm(Protocol):
    name: str
    dynamic: bool

    def place(self, snap: Snapshot) -> Placement: ...


@dataclass
class TokenStats:
    """Counters the controller keeps for the summary."""

    migrations: int = 0
    migrated_bytes: int = 0
    failed_migrations: int = 0
    refused_migrations: int = 0
    replans: int = 0
    emergencies: int = 0
    oom: int = 0
    decision_ms: list[float] = field(default_factory=list)
    logit_diff: float = 0.0
    mismatches: int = 0


@dataclass
class Options:
    interval: int
    telemetry: str  # oracle | measured
    probe_bytes: int = 2048
    token_timeout_s: float = 600.0  # emulated seconds a token may take before the run fails
    migration_timeout_s: float = 600.0


class Controller:
    def __init__(self, scenario: Scenario, model: ModelSpec, algorithm: Algorithm,
                 source_agent: DeviceAgent, weights: WeightSource, devices: list[str],
                 reference: tuple[list[int], torch.Tensor], prompt: list[int],
                 recorder: Recorder, hooks: RunHooks, options: Options, oracle: Any) -> None:
        self.scenario, self.model, self.alg = scenario, model, algorithm
        self.agent = source_agent
        self.agent.controller = self._on_message
        self.source_name = source_agent.name
        self.source = SourceBlock(model, weights.source())
        self.devices = devices  # index -> name (stable; failed devices stay listed)
        self.ref_ids, self.ref_logits = reference
        self.prompt = prompt
        self.rec, self.hooks, self.opt, self.oracle_view = recorder, hooks, options, oracle
        self.loop = asyncio.get_running_loop()
        self.placement: Placement | None = None
        self.route_version = 0
        self.stats = TokenStats()
        self._rid = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._seq = 0
        self._token_fut: asyncio.Future[torch.Tensor] | None = None
        self._fault: str | None = None
        self.t0 = 0.0
        self.k = 0  # token being produced
        self.ids: list[int] = []
        # measured-telemetry beliefs, seeded with the scenario's nominal values
        self._belief: Snapshot | None = None
        self._est_rate: np.ndarray | None = None
        self._est_lat: np.ndarray | None = None
        self._states: tuple[DeviceState, ...] | None = None
        self._tel_task: asyncio.Task[None] | None = None
        self._urgent: str | None = None  # a pressure signal asks for a re-plan before the next token
        self._state_at = [-math.inf] * len(devices)  # device clock time of each device's last report

    # ------------------------------------------------------------------ messages

    def _on_message(self, sender: str, m: dict[str, Any]) -> None:
        t = m["t"]
        if t == P.ACK:
            fut = self._pending.pop(m["rid"], None)
            if fut is not None and not fut.done():
                fut.set_result(m)
        elif t == P.OUT:
            fut = self._token_fut
            if fut is not None and not fut.done() and m["seq"] == self._seq:
                fut.set_result(m["x"])
        elif t == P.PRESSURE:
            self._urgent = self._urgent or f"memory_pressure@{m['device']}"
            self._update_memory(m["device"], m["memory"], m["at"])
        elif t == P.LINK_CHANGE:
            self._urgent = self._urgent or f"link_change@{m['device']}->{m['peer']}"
            if self._est_rate is not None and self.opt.telemetry == "measured":
                i, j = self.devices.index(m["device"]), self.devices.index(m["peer"])
                self._est_rate[i, j] = m["rate"]
                if m["latency"] is not None:
                    self._est_lat[i, j] = m["latency"]  # type: ignore[index]
        elif t == P.ERROR:
            if m["kind"] == "oom":
                self._update_memory(m["device"], m["memory"], m["at"])
                self.stats.oom += 1
                self.rec.event(self.now(), self.k, "oom", m["device"],
                               f"layer={m.get('layer')} bytes={m.get('bytes')} {m.get('detail', '')}")
                fut = self._token_fut
                if fut is not None and not fut.done() and m.get("seq") == self._seq:
                    fut.set_exception(OutOfMemory(m))
            else:
                self.fault(f"{m['device']}: {m.get('detail')}")
        else:
            raise P.ProtocolError(f"controller got unexpected message {t!r}")

    def _update_memory(self, device: str, mem: dict[str, int], at: float) -> None:
        """Fresh memory numbers from a device (pressure signal, refused allocation) replace
        the measured belief at once, without waiting for the next telemetry round; a
        report older than what we hold (by the device's own clock) is ignored."""
        i = self.devices.index(device)
        if self._states is None or at < self._state_at[i]:
            return
        self._state_at[i] = at
        st = self._states[i]
        new = DeviceState.from_memory(st.name, st.flops, mem, st.host_blocks, st.alive)
        self._states = (*self._states[:i], new, *self._states[i + 1:])

    def fault(self, why: str) -> None:
        """An agent or the transport failed: stop the run at the next await."""
        if self._fault is None:
            self._fault = why
        for fut in [self._token_fut, *self._pending.values()]:
            if fut is not None and not fut.done():
                fut.set_exception(RunFailed(why))

    def _request(self, dev: str, msg: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        rid = next(self._rid)
        fut = self.loop.create_future()
        self._pending[rid] = fut
        self.agent.send(dev, {**msg, "rid": rid})
        return fut

    async def _gather(self, futs: list[asyncio.Future[dict[str, Any]]], timeout: float,
                      what: str) -> list[dict[str, Any]]:
        """Answers to requests, in order; RunFailed if one is missing after `timeout`."""
        if not futs:
            return []
        _, pending = await asyncio.wait(futs, timeout=timeout)
        if pending:
            for f in pending:
                f.cancel()
            raise RunFailed(f"{what}: {len(pending)} of {len(futs)} answers missing after {timeout:g} s")
        return [f.result() for f in futs]

    def now(self) -> float:
        return self.loop.time() - self.t0

    # ------------------------------------------------------------------ snapshots

    def seq_len(self) -> int:
        """Positions every cache holds before the token being produced."""
        return len(self.prompt) + max(0, self.k - 1) if self.k > 0 else 0

    async def snapshot(self) -> Snapshot:
        """The controller's view for a decision now. Oracle: the emulator's truth. Measured:
        the latest telemetry reports; a fresh round is requested and not waited for (it
        informs the next epoch), except at deployment, where there is nothing yet."""
        n, interval = self.seq_len(), self.opt.interval
        if self.k == 0:
            n, interval = 0, len(self.prompt) + self.opt.interval
        if self.opt.telemetry == "oracle":
            snap = self.oracle_view(n, interval, self.placement)
        else:
            if self._states is None:
                await self._telemetry_round()
            elif self._tel_task is None or self._tel_task.done():
                self._tel_task = self.loop.create_task(self._telemetry_round())
            snap = self._measured(n, interval)
        self._belief = snap
        return snap

    async def _telemetry_round(self) -> None:
        V = len(self.devices)
        if self._est_rate is None:  # start from the scenario's nominal network
            net = self.scenario.network
            self._est_rate, self._est_lat = np.full((V, V), np.inf), np.zeros((V, V))
            for i, a in enumerate(self.devices):
                for j, b in enumerate(self.devices):
                    if i != j:
                        lk = net.link(a, b)
                        self._est_rate[i, j], self._est_lat[i, j] = lk.rate_bytes, lk.latency_s
        assert self._est_lat is not None
        futs = [self._request(d, {"t": P.TELEMETRY, "probe_bytes": self.opt.probe_bytes})
                for d in self.devices]
        try:
            replies = await self._gather(futs, self.opt.token_timeout_s, "telemetry")
        except RunFailed as e:
            self.fault(str(e))
            return
        states = list(self._states) if self._states is not None else [None] * V
        for i, (d, r) in enumerate(zip(self.devices, replies, strict=True)):
            for peer, obs in r["links"].items():  # links idle since the last round keep
                j = self.devices.index(peer)      # their estimate (the device probes them)
                if obs["rate"] is not None:
                    self._est_rate[i, j] = obs["rate"]
                if obs["latency"] is not None:
                    self._est_lat[i, j] = obs["latency"]
            if r["at"] < self._state_at[i]:
                continue  # a pressure signal or oom report since then is fresher
            self._state_at[i] = r["at"]
            states[i] = DeviceState.from_memory(d, float(r["flops"]), r["memory"],
                                                self.scenario.device(d).host_blocks)
        self._states = tuple(states)  # type: ignore[arg-type]

    def _measured(self, n: int, interval: int) -> Snapshot:
        assert self._states is not None and self._est_rate is not None and self._est_lat is not None
        V = len(self.devices)
        return Snapshot(self.model, self._states, self._est_rate.copy(), self._est_lat.copy(),
                        np.zeros((V, V)), self.devices.index(self.source_name), n, interval,
                        self.placement)

    def predicted_ms(self, tokens: int, n: int) -> float:
        snap = self._belief
        if snap is None or self.placement is None:
            return math.nan
        if self.opt.telemetry == "oracle":
            snap = self.oracle_view(snap.seq_len, snap.interval, self.placement)
        return LatencyModel(snap, tokens).token_time(self.placement, n) * 1e3

    # ------------------------------------------------------------------ placement

    async def deploy(self) -> None:
        """Initial placement: plan, load blocks from local weights, route."""
        snap = await self.snapshot()
        placement = self._plan(snap, "initial")
        by_dev: dict[str, list[str]] = {}
        for b, j in placement.items():
            by_dev.setdefault(self.devices[j], []).append(b.name)
        futs = [self._request(d, {"t": P.LOAD, "blocks": names}) for d, names in by_dev.items()]
        for r in await self._gather(futs, self.opt.migration_timeout_s, "deployment"):
            if not r["ok"]:
                detail = "; ".join(f"{k}: {v}" for k, v in r["refused"].items())
                self.rec.event(self.now(), 0, "infeasible", r["device"], detail)
                raise RunFailed(f"infeasible: {r['device']} refused blocks at deployment ({detail})")
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
        ms = (time.perf_counter() - w0) * 1e3
        self.stats.decision_ms.append(ms)
        self.stats.replans += 1
        gain = ""
        if snap.current is not None:
            lm = LatencyModel(snap)
            gain = f" predicted_gain_ms={(epoch_objective(snap, snap.current, lm) - epoch_objective(snap, new, lm)) * 1e3:.3f}"
        moves = len(snap.current.moves(new)) if snap.current is not None else len(self.model.blocks)
        self.rec.event(self.now(), self.k, "replan", self.alg.name,
                       f"reason={reason} decision_ms={ms:.3f} moves={moves}{gain}")
        return new

    async def _route(self, placement: Placement) -> None:
        self.route_version += 1
        msg = {"t": P.ROUTE, "version": self.route_version, "devices": self.devices,
               "assign": list(placement.assign)}
        await self._gather([self._request(d, msg) for d in self.devices], self.opt.migration_timeout_s, "routing")
        self.placement = placement

    async def epoch(self, reason: str) -> tuple[int, int]:
        """Re-plan and migrate; returns (migrations, bytes) applied."""
        snap = await self.snapshot()
        self.hooks.on_epoch(self.k)
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
        by_dst: dict[int, dict[str, int]] = {}
        for b, _, c in moves:
            by_dst.setdefault(c, {})[b.name] = sizes[b.name]
        dsts = list(by_dst)
        acks = await self._gather([self._request(names[c], {"t": P.RESERVE, "blocks": by_dst[c]}) for c in dsts],
                                  self.opt.migration_timeout_s, "reservation")
        reserved = {name for a in acks for name in a["reserved"]}
        go = []
        for b, a, c in moves:
            if b.name in reserved:
                go.append((b, a, c))
            else:
                self.stats.refused_migrations += 1
                self.rec.event(self.now(), self.k, "migration_refused", b.name,
                               f"from={names[a]} to={names[c]} bytes={sizes[b.name]} (no room at destination)")
        # phase 2: snapshots over the links; the destination acknowledges the install
        starts = {b.name: self.loop.time() for b, _, _ in go}
        futs = [self._request(names[a], {"t": P.MIGRATE, "block": b.name, "to": names[c]}) for b, a, c in go]
        timeout = self._migration_timeout(go, n)
        done, _ = await asyncio.wait(futs, timeout=timeout) if futs else (set(), set())
        assign = list(self.placement.assign)
        count = nbytes = 0
        failed: dict[int, list[str]] = {}
        for (b, a, c), fut in zip(go, futs, strict=True):
            r = fut.result() if fut in done and not fut.exception() else None
            if r is not None and r.get("ok"):
                assign[self._bindex(b)] = c
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
                failed.setdefault(c, []).append(b.name)
        if failed:  # give back the reservations of moves that did not happen
            await self._gather([self._request(names[c], {"t": P.CANCEL, "blocks": bl}) for c, bl in failed.items()],
                               self.opt.migration_timeout_s, "cancel")
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
        """How long to wait for installs: generous against the believed link rates (a
        transfer that takes far longer has failed, e.g. on a link that went down)."""
        snap = self._belief
        if snap is None or not moves:
            return self.opt.migration_timeout_s
        from ..placement.problem import migration_delay

        expected = migration_delay(snap.with_(seq_len=n), moves)
        rtt = 2 * float(snap.latency.max())
        return min(self.opt.migration_timeout_s, 5.0 + 4.0 * expected + 4.0 * rtt)

    async def stop(self) -> None:
        """Cancel background telemetry; answer nothing more."""
        task, self._tel_task = self._tel_task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()

    def _bindex(self, b: Block) -> int:
        from ..placement.problem import block_index

        return block_index(self.model)[b.name]

    # ------------------------------------------------------------------ generation

    async def _pipeline(self, tokens: list[int], pos: int) -> torch.Tensor:
        """One attempt: hidden states in at the source, final hidden states back."""
        assert self.placement is not None
        self._seq += 1
        fut: asyncio.Future[torch.Tensor] = self.loop.create_future()
        self._token_fut = fut
        x = self.source.embed(tokens, pos)
        msg = {"t": P.LAYER_IN, "seq": self._seq, "layer": 0, "pos": pos, "x": x}
        # the source agent knows the routing; it fans x out exactly as an ffn device would
        for dst in self.agent.layer_targets(0):
            if dst == self.source_name:
                self.agent.handle(self.source_name, msg)
            else:
                self.agent.send(dst, msg)
        try:
            return await asyncio.wait_for(fut, self.opt.token_timeout_s)
        except TimeoutError:
            raise RunFailed(f"token {self.k} did not complete within {self.opt.token_timeout_s:g} s "
                            "(emulated): the pipeline stalled") from None
        finally:
            self._token_fut = None

    async def _abort(self) -> None:
        msg = {"t": P.ABORT, "seq": self._seq}
        await self._gather([self._request(d, msg) for d in self.devices], self.opt.token_timeout_s, "abort")

    async def produce(self, k: int) -> dict[str, Any]:
        """Produce token k (k = 0 is the prefill); returns its tokens.csv row."""
        self.k = k
        if self._fault:
            raise RunFailed(self._fault)
        t_start = self.loop.time()
        stall = 0.0
        migrations = mbytes = 0
        urgent, self._urgent = self._urgent, None
        if k > 0 and self.alg.dynamic and (k % self.opt.interval == 0 or urgent):
            if urgent:
                self.stats.emergencies += 1
            m, b = await self.epoch(f"emergency:{urgent}" if urgent else "interval")
            migrations, mbytes = migrations + m, mbytes + b
            stall += self.loop.time() - t_start
        if k == 0:
            tokens, pos = list(self.prompt), 0
        else:
            tokens, pos = [self.ids[-1]], len(self.prompt) + k - 1
        predicted = self.predicted_ms(len(tokens), pos + len(tokens))
        while True:
            try:
                hidden = await self._pipeline(tokens, pos)
                break
            except OutOfMemory as e:
                s0 = self.loop.time()
                await self._abort()
                if not self.alg.dynamic:
                    raise RunFailed(f"out of memory on {e.msg['device']} at token {k} "
                                    f"({self.alg.name} does not re-plan)") from None
                self.stats.emergencies += 1
                m, b = await self.epoch(f"emergency:oom@{e.msg['device']}")
                migrations, mbytes = migrations + m, mbytes + b
                if m == 0:
                    raise RunFailed(f"out of memory on {e.msg['device']} at token {k} and "
                                    f"re-planning moved nothing") from None
                stall += self.loop.time() - s0
                predicted = self.predicted_ms(len(tokens), pos + len(tokens))
        logits = await self.agent.compute.run(cost.source_flops(self.model), self._lm_head, hidden)
        tok = int(logits.argmax())
        self.ids.append(tok)
        latency = self.loop.time() - t_start
        ref = self.ref_ids[k] if k < len(self.ref_ids) else -1
        if k < len(self.ref_logits):
            diff = float((logits - self.ref_logits[k]).abs().max())
            self.stats.logit_diff = max(self.stats.logit_diff, diff)
        if tok != ref:
            self.stats.mismatches += 1
        return {
            "token": k, "t_start_s": round(t_start - self.t0, 9), "latency_ms": round(latency * 1e3, 6),
            "predicted_ms": round(predicted, 6), "stall_ms": round(stall * 1e3, 6),
            "migrations": migrations, "migrated_bytes": mbytes, "token_id": tok, "ref_token_id": ref,
            "phase": "prefill" if k == 0 else "decode",
        }

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.source.logits(hidden[-1:])[0]
