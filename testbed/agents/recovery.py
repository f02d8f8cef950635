"""The controller's repairs when devices come and go: a device lost (its connection broke,
it stopped answering, or it is cut off from the source) is recovered by loading its blocks
again from local weights on the survivors and rebuilding their caches by replaying the
token history through the pipeline; a device that joins is added to the beliefs; a device
cut off by a dead link rejoins when the link returns.

Owns the devices waiting to be recovered (`lost`), those cut off (`unreachable`) and those
whose link came back (`revive`). It works through the `Migrator` and `Requests` it is
given, and asks the controller (a `Driver`, parts.py) for snapshots, decisions, aborts and
replays; the policy says whether a lost device can be recovered from at all.
"""

from __future__ import annotations

from ..model.spec import Block
from ..placement.policy import Policy
from ..placement.problem import Placement, block_index
from ..scenario.records import Scenario
from .beliefs import Beliefs
from .errors import DeviceLost, RunFailed
from .messages import Join
from .migration import Migrator
from .parts import Driver, Recorder, Stats
from .requests import Requests


class Recovery:
    def __init__(self, scenario: Scenario, source: str, beliefs: Beliefs, requests: Requests,
                 mover: Migrator, recorder: Recorder, stats: Stats, policy: Policy, driver: Driver) -> None:
        self.scenario, self.source, self.beliefs = scenario, source, beliefs
        self.requests, self.mover, self.rec, self.stats = requests, mover, recorder, stats
        self.policy, self.ctl = policy, driver
        self.loop = requests.loop
        self.lost: list[str] = []  # devices gone and not yet recovered from
        self.unreachable: set[str] = set()  # alive, but their link to the source is down
        self.revive: list[str] = []  # unreachable devices whose link came back

    def device_lost(self, device: str, why: str) -> None:
        """A device is gone (its connection broke, it stopped answering): everything that
        waits on it fails now; recovery happens before the next attempt."""
        b = self.beliefs
        if device not in b.names or device in self.lost or not b.alive[b.index(device)]:
            return
        if device == self.source:
            self.ctl.fault(f"the source device {device} is gone ({why})")
            return
        self.lost.append(device)
        b.lost(device)
        self.rec.event(self.ctl.now(), self.ctl.k, "device_failed", device, why)
        err = DeviceLost([device], why)
        self.ctl.interrupt(err)
        self.requests.fail_device(device, err)

    def link_to_source(self, other: str, rate: float) -> None:
        """An alarm about the link between the source and `other`: cut off (rate 0), no
        control message gets through either; back up, `other` may rejoin."""
        if rate <= 0:
            self.unreachable.add(other)
            self.revive = [d for d in self.revive if d != other]
            self.device_lost(other, "unreachable: its link to the source is down")
        elif other in self.unreachable and other not in self.revive:
            self.revive.append(other)

    def joined(self, m: Join) -> None:
        name = m.device
        if name in self.beliefs.names:
            return
        links = self.scenario.network
        join = self.scenario.joins().get(name)
        spec = join.links if join is not None else {}
        self.beliefs.add_device(name, m.host_blocks, {o: spec.get(o, links.default) for o in self.beliefs.names})
        self.beliefs.memory(name, m.memory, m.at, float(m.flops))
        self.rec.event(self.ctl.now(), self.ctl.k, "device_joined", name, f"flops={m.flops:g}")
        self.ctl.signal(f"join@{name}")

    async def rejoin(self) -> None:
        """Devices reachable again: their stale blocks are freed by the current routing (the
        controller gave those blocks to others) and they may host blocks again."""
        back, self.revive = self.revive, []
        for d in back:
            self.unreachable.discard(d)
            self.beliefs.revive(d)
        if self.mover.placement is not None:
            msg = self.mover.route_message(self.mover.placement)
            await self.requests.ask(dict.fromkeys(back, msg), "routing")
        for d in back:
            self.rec.event(self.ctl.now(), self.ctl.k, "device_rejoined", d, "reachable again; stale blocks freed")

    async def recover(self) -> None:
        """Re-place the blocks of lost devices, load them from local weights, and rebuild
        their caches by replaying the token history through the pipeline."""
        lost, self.lost = self.lost, []
        t0 = self.ctl.now()  # the controller's emulated instant
        mover, ctl = self.mover, self.ctl
        assert mover.placement is not None
        reason = self.policy.emergency("lost", ctl.k, lost)  # Stop if it does not re-plan
        await ctl.abort()
        snap = await ctl.snapshot()
        self.stats.emergencies += 1
        new = await ctl.plan(snap, reason)
        names = self.beliefs.names
        dead = {names.index(d) for d in lost}
        orphans = {b.name: names[c] for b, a, c in mover.placement.moves(new) if a in dead}
        stranded = [b.name for b, j in new.items() if j in dead]
        if stranded:
            raise RunFailed(f"re-planning left blocks on lost devices: {stranded[:3]}")
        await mover.load(orphans, "recovery")
        assign = list(mover.placement.assign)
        for name, dev in orphans.items():
            assign[block_index(mover.model)[name]] = names.index(dev)
        mover.placement = Placement(mover.model, tuple(assign))
        self.rec.placement(ctl.k, sorted(orphans.items()))
        await mover.route(mover.placement)
        rest = [(b, a, c) for b, a, c in mover.placement.moves(new)]
        if rest:
            await mover.migrate(rest, snap)
        # the reloaded heads have empty caches: replay the history (positions already held
        # elsewhere are rewritten with the same values)
        n = ctl.seq_len()
        if n > 0 and any(Block.parse(b).kind == "head" for b in orphans):
            await ctl.replay(n)
        ms = (self.ctl.now() - t0) * 1e3
        self.stats.recover_ms.append(ms)
        self.rec.event(self.ctl.now(), ctl.k, "recovered", ",".join(lost),
                       f"reloaded={len(orphans)} replayed_positions={n} ms={ms:.3f}")
