"""Fastest device first: a small placement plug-in for the testbed (docs/plugins.md writes
it step by step).

Every block, in model order, goes to the fastest device (highest FLOP/s) that still has
room for it, its K/V cache grown to the end of the coming interval. It looks neither at
links nor at where the blocks were before, and it plans once.

    python -m runners.run scenarios/bandwidth_drop.yaml --clock virtual \\
        --algorithm examples/fastest_first.py:FastestFirst,resource_aware
"""

from __future__ import annotations

from testbed.model import cost
from testbed.placement.problem import Infeasible, Placement, Snapshot


class FastestFirst:
    name = "fastest_first"
    dynamic = False  # placed once, before the first token

    def place(self, snap: Snapshot) -> Placement:
        # devices that may hold blocks, fastest first (ties keep the scenario's order)
        usable = [j for j, d in enumerate(snap.devices) if d.usable]
        order = sorted(usable, key=lambda j: snap.devices[j].flops, reverse=True)
        free = {j: snap.devices[j].capacity for j in order}  # bytes left on each device

        assign = []
        for block in snap.spec.blocks:  # per layer: its head groups, proj, ffn
            need = cost.block_bytes(snap.spec, block, snap.n_end)  # weights + cache
            j = next((j for j in order if free[j] >= need), None)
            if j is None:
                raise Infeasible(f"fastest_first: no device has {need} B free for {block.name}")
            free[j] -= need
            assign.append(j)
        return Placement(snap.spec, tuple(assign))
