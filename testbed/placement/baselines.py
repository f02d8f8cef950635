"""Simple placements: `greedy` (first fit) and `round_robin`. Pure.

Both walk the blocks in model order and respect memory with caches grown to the end of
the coming interval; neither looks at compute or links. They are planned once: a run
that outgrows them fails with the memory error instead of re-planning.
"""

from __future__ import annotations

import numpy as np

from ..model import cost
from .problem import Infeasible, Placement, Snapshot


def _sizes(snap: Snapshot) -> dict[str, int]:
    return {k: cost.block_bytes(snap.spec, k, snap.n_end) for k in ("head", "proj", "ffn")}


class Greedy:
    """First fit: each block on the first device (in scenario order) with room for it."""

    name = "greedy"
    dynamic = False

    def place(self, snap: Snapshot) -> Placement:
        sizes, free = _sizes(snap), np.array([d.capacity for d in snap.devices], dtype=np.int64)
        usable = [j for j, d in enumerate(snap.devices) if d.usable]
        assign = []
        for b in snap.spec.blocks:
            need = sizes[b.kind]
            j = next((j for j in usable if free[j] >= need), None)
            if j is None:
                raise Infeasible(f"greedy: no device has {need} B free for {b.name}")
            free[j] -= need
            assign.append(j)
        return Placement(snap.spec, tuple(assign))


class RoundRobin:
    """Blocks dealt to the usable devices in turn, skipping a device without room."""

    name = "round_robin"
    dynamic = False

    def place(self, snap: Snapshot) -> Placement:
        sizes, free = _sizes(snap), np.array([d.capacity for d in snap.devices], dtype=np.int64)
        usable = [j for j, d in enumerate(snap.devices) if d.usable]
        if not usable:
            raise Infeasible("round_robin: no device may host blocks")
        assign, turn = [], 0
        for b in snap.spec.blocks:
            need = sizes[b.kind]
            for k in range(len(usable)):
                j = usable[(turn + k) % len(usable)]
                if free[j] >= need:
                    break
            else:
                raise Infeasible(f"round_robin: no device has {need} B free for {b.name}")
            free[j] -= need
            assign.append(j)
            turn = (usable.index(j) + 1) % len(usable)
        return Placement(snap.spec, tuple(assign))
