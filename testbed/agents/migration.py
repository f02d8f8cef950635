"""The controller's hands: loading blocks from local weights, switching routing, and the
two-phase migration (reserve at the destination, send the snapshot
over the emulated link, install and acknowledge, switch routing everywhere, free at the
source). Owns the placement in force and the routing version; reaches the devices through
`Requests` and knows where generation is through a `Progress` (parts.py).
"""

from __future__ import annotations

import math
from functools import partial
from types import MappingProxyType

from ..model import cost
from ..model.spec import Block, ModelSpec
from ..placement.problem import Placement, Snapshot, block_index, migration_delay
from . import messages as P
from .beliefs import Beliefs
from .errors import RunFailed
from .parts import Progress, Recorder, Stats
from .requests import Make, Requests


class Migrator:
    def __init__(self, model: ModelSpec, requests: Requests, beliefs: Beliefs, recorder: Recorder,
                 stats: Stats, progress: Progress) -> None:
        self.model, self.requests, self.beliefs = model, requests, beliefs
        self.rec, self.stats, self.at = recorder, stats, progress
        self.loop = requests.loop
        self.placement: Placement | None = None
        self.route_version = 0

    async def load(self, where: dict[str, str], what: str) -> None:
        """Load blocks from local weights (block -> device); a refusal is infeasible."""
        by_dev: dict[str, list[str]] = {}
        for block, dev in where.items():
            by_dev.setdefault(dev, []).append(block)
        replies = await self.requests.ask({d: partial(P.Load, blocks=tuple(names)) for d, names in by_dev.items()}, what)
        for d in by_dev:
            r = replies.get(d)
            if r is None or not r.ok:
                detail = "; ".join(f"{k}: {v}" for k, v in r.reply["refused"].items()) if r else "no answer"
                self.rec.event(self.at.now(), self.at.k, "infeasible", d, detail)
                raise RunFailed(f"infeasible: {d} refused blocks at {what} ({detail})")

    def route_message(self, placement: Placement) -> Make:
        """The routing of `placement` at the current version, as a request."""
        return partial(P.Route, version=self.route_version, devices=tuple(self.beliefs.names),
                       assign=tuple(placement.assign))

    async def route(self, placement: Placement) -> None:
        """Switch routing on every live device to `placement` (sources free what left)."""
        self.route_version += 1
        msg = self.route_message(placement)
        await self.requests.ask({d: msg for d in self.beliefs.alive_names()}, "routing")
        self.placement = placement

    async def migrate(self, moves: list[tuple[Block, int, int]], view: Snapshot | None) -> tuple[int, int]:
        """Apply moves (block, from, to) with the two-phase migration; `view` is the
        decision's snapshot (its links bound the wait). Returns (migrations, bytes) done."""
        assert self.placement is not None
        n = self.at.seq_len()
        names = self.beliefs.names
        sizes = {b.name: cost.block_bytes(self.model, b, n) for b, _, _ in moves}
        # phase 1: reserve memory at every destination
        by_dst: dict[str, dict[str, int]] = {}
        for b, _, c in moves:
            by_dst.setdefault(names[c], {})[b.name] = sizes[b.name]
        acks = await self.requests.ask({d: partial(P.Reserve, blocks=MappingProxyType(bl)) for d, bl in by_dst.items()},
                                       "reservation")
        reserved = {name for a in acks.values() for name in a.reply["reserved"]}
        go = []
        down = [] if view is None else [
            (b, a, c) for b, a, c in moves if self.beliefs.rate[a, c] <= 0 and b.name in reserved]
        for b, a, c in down:
            self.stats.failed_migrations += 1
            self.rec.event(self.at.now(), self.at.k, "migration_failed", b.name,
                           f"from={names[a]} to={names[c]} bytes={sizes[b.name]} the link is down")
            reserved.discard(b.name)
            by_dst[names[c]].pop(b.name, None)
        if down:
            await self.requests.ask({names[c]: partial(P.Cancel, blocks=(b.name,)) for b, _, c in down
                             if names[c] in self.beliefs.alive_names()}, "cancel")
        for b, a, c in moves:
            if (b, a, c) in down:
                continue
            if b.name in reserved:
                go.append((b, a, c))
            else:
                self.stats.refused_migrations += 1
                self.rec.event(self.at.now(), self.at.k, "migration_refused", b.name,
                               f"from={names[a]} to={names[c]} bytes={sizes[b.name]} (no room at destination)")
        # phase 2: snapshots over the links; the destination acknowledges the install
        start = self.requests.timeline.now()  # the controller's emulated instant (requests.py)
        futs = [self.requests.request(names[a], partial(P.Migrate, block=b.name, to=names[c])) for b, a, c in go]
        if futs:
            await self.requests.wait(futs, self._timeout(view, go, n))
        assign = list(self.placement.assign)
        count = nbytes = 0
        failed: dict[str, list[str]] = {}
        for (b, a, c), fut in zip(go, futs, strict=True):
            r = fut.result() if fut.done() and not fut.cancelled() and fut.exception() is None else None
            if not fut.done():
                fut.cancel()
            if r is not None and r.ok:
                assign[block_index(self.model)[b.name]] = c
                count += 1
                nbytes += sizes[b.name]
                ms = (self.requests.timeline.now() - start) * 1e3
                self.rec.event(self.at.now(), self.at.k, "migration", b.name,
                               f"from={names[a]} to={names[c]} bytes={sizes[b.name]} ms={ms:.3f}")
            else:
                self.stats.failed_migrations += 1
                why = r.reply.get("detail") if r else "no acknowledgement"
                self.rec.event(self.at.now(), self.at.k, "migration_failed", b.name,
                               f"from={names[a]} to={names[c]} bytes={sizes[b.name]} {why}")
                failed.setdefault(names[c], []).append(b.name)
        alive = set(self.beliefs.alive_names())
        cancel: dict[str, Make] = {d: partial(P.Cancel, blocks=tuple(bl)) for d, bl in failed.items() if d in alive}
        await self.requests.ask(cancel, "cancel")  # give back the reservations of moves that did not happen
        new = Placement(self.model, tuple(assign))
        changes = [(b.name, names[c]) for b, _, c in self.placement.moves(new)]
        # phase 3: switch routing everywhere; sources free what moved away
        await self.route(new)
        if changes:
            self.rec.placement(self.at.k, changes)
        self.stats.migrations += count
        self.stats.migrated_bytes += nbytes
        return count, nbytes

    def _timeout(self, view: Snapshot | None, moves: list[tuple[Block, int, int]], n: int) -> float:
        """Generous against the believed link rates: a transfer that takes far longer has
        failed (e.g. its link went down)."""
        limit = self.requests.timeout_s
        if view is None or not moves:
            return limit
        expected = migration_delay(view.with_(seq_len=n), moves)
        if not math.isfinite(expected):
            return limit
        rtt = 2 * float(view.latency.max())
        return min(limit, 5.0 + 4.0 * expected + 4.0 * rtt)
