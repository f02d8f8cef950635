"""Pre-copy migration, the controller's shell around the pure rule (placement/precopy.py):
blocks move while generation goes on, and generation pauses only for the last delta.

Per block: the destination reserves memory; stage 0 (the weights and the cache as of now)
crosses the emulated link while the source keeps computing and appending; at each token
boundary the controller looks at the stages in flight and, for one that has arrived, issues
the next (the entries appended meanwhile) or, when the rule says so, marks the block ready.
The ready blocks switch together at a token boundary, where no attempt is in flight: their
last deltas cross (the token waits for them: the stall), routing switches everywhere, the
sources free the blocks. Stage frames share the emulated links with inference frames (a
link is one FIFO: a frame queued behind a stage waits for it).

Rollback, at any stage: a refused reservation, a stage not acknowledged in time or refused
(the destination out of memory), a dead link, a lost source or destination, or a re-plan
that sends the block elsewhere (or keeps it) cancels the move at the destination (its
reservation or its partial copy is freed) and the block goes on serving from its source,
which never stopped holding it. Nothing is routed to the destination before the switch, so
nothing is lost or duplicated.

Owns the moves in flight. Reaches devices through `Requests`, switches routing through the
`Migrator` (which owns the placement in force) and knows where generation is through a
`Progress` (parts.py).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType

from ..model import cost
from ..model.spec import Block, ModelSpec
from ..placement.precopy import Stage, first_stage, next_stage
from ..placement.problem import Placement, block_index, xfer_time
from . import messages as P
from .beliefs import Beliefs
from .migration import Migrator
from .parts import Progress, Recorder, Stats
from .requests import Make, Requests


@dataclass
class Move:
    """One block's pre-copy in flight."""

    block: Block
    src: int
    dst: int
    t0: float  # loop time it started
    k0: int  # the token it started before
    fut: asyncio.Future[P.Ack] | None = None  # the request in flight (reservation or stage)
    stage: Stage | None = None  # None while the reservation is in flight
    issued: float = 0.0  # when the request in flight was sent
    done_at: float = math.nan  # when its answer arrived
    deadline: float = math.inf
    sent: int = 0  # positions the finished stages carried: [0, sent)
    stages: list[tuple[int, int, int, float]] = field(default_factory=list)  # (since, upto, bytes, ms)
    ready: bool = False
    pending_bytes: int = 0  # what its request in flight puts on its link


class PreCopier:
    def __init__(self, model: ModelSpec, requests: Requests, beliefs: Beliefs, recorder: Recorder,
                 stats: Stats, progress: Progress, mover: Migrator) -> None:
        self.model, self.requests, self.beliefs = model, requests, beliefs
        self.rec, self.stats, self.at, self.mover = recorder, stats, progress, mover
        self.loop = requests.loop
        self.moves: dict[str, Move] = {}
        # cancels owed to destinations that were unreachable at the rollback (cut off from
        # the source): sent when they are back, so no partial copy outlives its move
        self.owed: dict[str, set[str]] = {}

    # ------------------------------------------------------------------ starting

    async def start(self, moves: list[tuple[Block, int, int]]) -> None:
        """A decision wants `moves` (block, from, to) against the placement in force: moves
        in flight to the same destination go on, the others roll back; new ones start
        (their reservations are sent; nothing is waited for)."""
        await self.settle()
        want = {b.name: c for b, _, c in moves}
        back = [m for name, m in self.moves.items() if want.get(name) != m.dst]
        await self._rollback(back, "the controller re-planned")
        names = self.beliefs.names
        n = self.at.seq_len()
        for b, a, c in moves:
            if b.name in self.moves:
                continue
            m = Move(b, a, c, self.loop.time(), self.at.k)
            size = cost.block_bytes(self.model, b, n)
            self.moves[b.name] = m
            self._issue(m, names[c], partial(P.Reserve, blocks=MappingProxyType({b.name: size})), size)

    def _issue(self, m: Move, dev: str, make: Make, nbytes: int, then: bool = True) -> None:
        """Send a request of the move; `then`: its answer advances the move at once."""
        fut = m.fut = self.requests.request(dev, make)
        m.issued, m.done_at = self.loop.time(), math.nan
        m.pending_bytes = nbytes if m.stage is not None else 0

        def answered(_: object) -> None:
            m.done_at = self.loop.time()
            m.pending_bytes = 0
            if then and m.fut is fut and self.moves.get(m.block.name) is m:
                self._advance(m)

        fut.add_done_callback(answered)
        rate, lat = self.beliefs.rate[m.src, m.dst], self.beliefs.lat[m.src, m.dst]
        # the stages queued on the same link go first (a link is FIFO)
        queued = sum(o.pending_bytes + cost.FRAME_OVERHEAD for o in self.moves.values()
                     if (o.src, o.dst) == (m.src, m.dst) and o is not m)
        expected = xfer_time(queued + nbytes + cost.FRAME_OVERHEAD, rate, lat)
        limit = self.requests.timeout_s
        # generous against the believed link (a stage far later has failed: its link went
        # down or collapsed); a rollback costs only the copy, the block serves meanwhile
        m.deadline = m.issued + (min(limit, 1.0 + 4.0 * expected + 8.0 * lat) if math.isfinite(expected) else limit)

    def _stage(self, m: Move, st: Stage, then: bool = True) -> None:
        names = self.beliefs.names
        m.stage = st
        self._issue(m, names[m.src], partial(P.Migrate, block=m.block.name, to=names[m.dst], since=st.since,
                                             upto=st.upto), self._bytes(m.block, st), then)

    def _advance(self, m: Move) -> None:
        """A request of the move answered well: the next stage goes at once, with the
        positions every cache holds before the token in flight (they are committed), or
        the move is ready to switch. A failed answer waits for the next boundary."""
        fut = m.fut
        if fut is None or fut.cancelled() or fut.exception() is not None or not fut.result().ok:
            return
        n = self.at.seq_len() if m.block.kind == "head" else 0
        if m.stage is None:  # the reservation answered
            if m.block.name in fut.result().reply.get("reserved", ()):
                self._stage(m, first_stage(n))
            return
        self._stage_done(m)
        st = next_stage(m.sent, n, len(m.stages), m.stages[-1][1] - m.stages[-1][0])
        if st.final:
            m.ready, m.stage, m.fut = True, st, None
        else:
            self._stage(m, st)

    def _bytes(self, b: Block, st: Stage) -> int:
        """What a stage carries: its cache entries, and the weights at stage 0."""
        rows = st.rows * cost.cache_bytes_per_token(self.model) if b.kind == "head" else 0
        return rows + (cost.weight_bytes(self.model, b) if st.since == 0 else 0)

    # ------------------------------------------------------------------ token boundaries

    async def boundary(self) -> tuple[int, int]:
        """At a token boundary (no attempt in flight): advance every move by the rule and
        switch the ready ones. Returns (migrations, bytes) switched now."""
        await self.settle()
        if not self.moves:
            return 0, 0
        names, alive = self.beliefs.names, set(self.beliefs.alive_names())
        now = self.loop.time()
        failed: list[tuple[Move, str]] = []
        for m in list(self.moves.values()):
            if m.ready:
                continue
            if names[m.src] not in alive or names[m.dst] not in alive:
                failed.append((m, "a device of the move is lost"))
            elif self.beliefs.rate[m.src, m.dst] <= 0:
                failed.append((m, "the link is down"))
            elif m.fut is None or not m.fut.done():
                if now > m.deadline:
                    failed.append((m, f"no acknowledgement within {m.deadline - m.issued:.3f} s"))
            elif m.fut.cancelled() or m.fut.exception() is not None or not m.fut.result().ok:
                r = None if m.fut.cancelled() or m.fut.exception() is not None else m.fut.result()
                failed.append((m, str(r.reply.get("detail", "refused")) if r else "no acknowledgement"))
            elif m.stage is None:  # the reservation answered, and refused
                self._refused(m)
        await self._rollback([m for m, _ in failed], None, dict((m.block.name, why) for m, why in failed))
        # the moves switch together, once every one is ready: a block's last delta, and the
        # routing round, would otherwise queue behind another's stage on a link while
        # generation waits
        if not self.moves or not all(m.ready for m in self.moves.values()):
            return 0, 0
        return await self._switch(list(self.moves.values()))

    def _stage_done(self, m: Move) -> None:
        st = m.stage
        assert st is not None
        nbytes = self._bytes(m.block, st)
        ms = (m.done_at - m.issued) * 1e3
        m.stages.append((st.since, st.upto, nbytes, ms))
        m.sent = st.upto
        names = self.beliefs.names
        self.rec.event(self.at.now(), self.at.k, "migration_stage", m.block.name,
                       f"from={names[m.src]} to={names[m.dst]} stage={len(m.stages) - 1} "
                       f"positions={st.since}-{st.upto} bytes={nbytes} ms={ms:.3f}")

    async def _switch(self, ready: list[Move]) -> tuple[int, int]:
        """The block pauses: the last deltas cross, then routing switches everywhere."""
        names = self.beliefs.names
        n = self.at.seq_len()
        t_pause = self.loop.time()
        finals: list[tuple[Move, asyncio.Future[P.Ack] | None]] = []
        for m in ready:
            st = m.stage
            assert st is not None
            last = Stage(st.since, n if m.block.kind == "head" else st.since, True)
            m.stage = last
            if last.rows > 0:
                self._stage(m, last, then=False)
                finals.append((m, m.fut))
            else:
                m.issued = m.done_at = t_pause
                finals.append((m, None))
        futs = [f for _, f in finals if f is not None]
        if futs:
            limit = max(m.deadline for m, f in finals if f is not None) - self.loop.time()
            await asyncio.wait(futs, timeout=max(0.0, limit))
        ok: list[Move] = []
        bad: dict[str, str] = {}
        for m, f in finals:
            if f is None or (f.done() and not f.cancelled() and f.exception() is None and f.result().ok):
                ok.append(m)
            else:
                bad[m.block.name] = "the last delta was not acknowledged" if f is None or not f.done() or f.cancelled() \
                    or f.exception() is not None else str(f.result().reply.get("detail", "refused"))
        await self._rollback([m for m, _ in finals if m.block.name in bad], None, bad)
        if not ok:
            return 0, 0
        assert self.mover.placement is not None
        assign = list(self.mover.placement.assign)
        index = block_index(self.model)
        for m in ok:
            if m.stage is not None and m.stage.rows > 0:
                self._stage_done(m)
            assign[index[m.block.name]] = m.dst
        old = self.mover.placement
        new = Placement(self.model, tuple(assign))
        await self.mover.route(new)
        t_end = self.loop.time()
        stall_ms = (t_end - t_pause) * 1e3
        changes = [(b.name, names[c]) for b, _, c in old.moves(new)]
        if changes:
            self.rec.placement(self.at.k, changes)
        total = 0
        for m in ok:
            del self.moves[m.block.name]
            nbytes = sum(s[2] for s in m.stages)
            total += nbytes
            per_stage = "/".join(str(s[2]) for s in m.stages)
            self.rec.event(self.at.now(), self.at.k, "migration", m.block.name,
                           f"from={names[m.src]} to={names[m.dst]} bytes={nbytes} ms={(t_end - m.t0) * 1e3:.3f} "
                           f"mechanism=pre_copy stages={len(m.stages)} stage_bytes={per_stage} "
                           f"stall_ms={stall_ms:.3f}")
            self.stats.migration_log.append({
                "block": m.block.name, "from": names[m.src], "to": names[m.dst], "mechanism": "pre_copy",
                "first_token": m.k0, "switch_token": self.at.k, "transfer_ms": round((t_end - m.t0) * 1e3, 6),
                "stall_ms": round(stall_ms, 6), "stages": len(m.stages), "stage_bytes": [s[2] for s in m.stages],
                "stage_ms": [round(s[3], 6) for s in m.stages], "bytes": nbytes})
        self.stats.migrations += len(ok)
        self.stats.migrated_bytes += total
        return len(ok), total

    # ------------------------------------------------------------------ rollback

    def _refused(self, m: Move) -> None:
        names = self.beliefs.names
        del self.moves[m.block.name]
        self.stats.refused_migrations += 1
        self.rec.event(self.at.now(), self.at.k, "migration_refused", m.block.name,
                       f"from={names[m.src]} to={names[m.dst]} bytes={cost.block_bytes(self.model, m.block, self.at.seq_len())} "
                       "(no room at destination)")

    async def settle(self) -> None:
        """Send the cancels owed to destinations that are reachable again."""
        alive = set(self.beliefs.alive_names())
        due = {d: tuple(sorted(bl)) for d, bl in self.owed.items() if d in alive}
        for d in due:
            del self.owed[d]
        await self.requests.ask({d: partial(P.Cancel, blocks=bl) for d, bl in due.items()}, "cancel")

    async def abandon(self, why: str, unfinished: bool = False) -> None:
        """Roll every move in flight back (a device lost, an urgent move by stop-and-copy;
        `unfinished`: the run ended, which is no failure)."""
        await self._rollback(list(self.moves.values()), why, unfinished=unfinished)

    async def _rollback(self, moves: list[Move], why: str | None, whys: dict[str, str] | None = None,
                        unfinished: bool = False) -> None:
        """Cancel `moves` at their destinations; the blocks serve from their sources."""
        if not moves:
            return
        names, alive = self.beliefs.names, set(self.beliefs.alive_names())
        cancel: dict[str, list[str]] = {}
        now = self.loop.time()
        for m in moves:
            self.moves.pop(m.block.name, None)
            if m.fut is not None and not m.fut.done() and now > m.deadline:
                m.fut.cancel()  # lost; one still on its way is answered and ignored (`_issue`)
            if not unfinished:
                self.stats.failed_migrations += 1
            stage = "reservation" if m.stage is None and not m.stages else f"stage {len(m.stages)}"
            reason = why if why is not None else (whys or {}).get(m.block.name, "failed")
            self.rec.event(self.at.now(), self.at.k, "migration_unfinished" if unfinished else "migration_failed",
                           m.block.name,
                           f"from={names[m.src]} to={names[m.dst]} bytes={sum(s[2] for s in m.stages)} "
                           f"pre_copy {stage}: {reason}; rolled back, the block serves from {names[m.src]}")
            if names[m.dst] in alive:
                cancel.setdefault(names[m.dst], []).append(m.block.name)
            else:
                self.owed.setdefault(names[m.dst], set()).add(m.block.name)
        await self.requests.ask({d: partial(P.Cancel, blocks=tuple(bl)) for d, bl in cancel.items()}, "cancel")
