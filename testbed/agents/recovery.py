"""The controller's repairs when devices come and go: a device lost (its connection broke,
it stopped answering, or it is cut off from the source) is recovered by loading its blocks
again from local weights on the survivors and rebuilding their caches by replaying the
token history through the pipeline; a device that joins is added to the beliefs; a device
cut off by a dead link rejoins when the link returns. A mixin of `Controller`.
"""

from __future__ import annotations

from typing import Any

from ..model.spec import Block
from ..placement.problem import Placement, block_index
from . import protocol as P
from .errors import DeviceLost, RunFailed


class Recovery:
    """Mixed into Controller (which provides _ask, beliefs, rec, placement, ...)."""

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
        reason = self.policy.emergency("lost", self.k, lost)  # Stop if it does not re-plan
        await self._abort()
        snap = await self.snapshot()
        self.stats.emergencies += 1
        new = self._plan(snap, reason)
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
