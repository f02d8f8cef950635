"""The planner's view of a load that changes every token (pure).

Owns one rule, shared by the controller and the analytic simulation (testbed/analytic/simulate.py):
when co-tenants take a different share of a device's memory and compute at every token, a
plan made on the latest observation alone runs out of memory at the next token, and a
compute rate read at one instant is noise. So the planner sees, per device, the mean
compute rate (and memory bandwidth) and the least room for blocks (soft and hard) over the observations of the
last `tokens` tokens, the current one included. With `tokens` = 1 (the controller's
default) the view is the latest observation unchanged.

No asyncio, no IO: observations come in as `DeviceState`s with the token they were taken at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from .problem import DeviceState


class LoadWindow:
    """The last `tokens` tokens' observations of every device, and the view they give."""

    def __init__(self, tokens: int) -> None:
        if tokens < 1:
            raise ValueError(f"a load window covers at least one token, got {tokens}")
        self.tokens = tokens
        # token -> (names of the devices alive then, [4, V] flops, capacity, hard capacity, bandwidth)
        self._seen: dict[int, tuple[tuple[str, ...], np.ndarray]] = {}

    def observe(self, token: int, devices: Sequence[DeviceState]) -> tuple[DeviceState, ...]:
        """Record the devices as seen at `token` (a later observation of the same token
        replaces the earlier one: the freshest state of a token counts) and return the view
        for a decision now. Devices that are gone are left as they are, and so is a device
        never observed alive in the window."""
        alive = [d for d in devices if d.alive]
        self._seen[token] = (tuple(d.name for d in alive),
                             np.array([[d.flops, d.capacity, d.hard_capacity, d.bandwidth] for d in alive],
                                      float).T.reshape(4, -1))
        for old in [k for k in self._seen if k <= token - self.tokens]:
            del self._seen[old]
        if self.tokens == 1:
            return tuple(devices)
        names = self._seen[token][0]
        rows = [self._seen[k] for k in sorted(self._seen)]
        if all(n == names for n, _ in rows):  # the usual case: the same devices throughout
            stack = np.stack([x for _, x in rows])  # [tokens, 4, V]
            flops, cap, hard = stack[:, 0].mean(axis=0), stack[:, 1].min(axis=0), stack[:, 2].min(axis=0)
            bw = stack[:, 3].mean(axis=0)
        else:  # devices joined or left within the window: each over the tokens it was seen
            seen = [np.array([x[:, ns.index(n)] for ns, x in rows if n in ns]) for n in names]
            flops, cap, hard = (np.array([s[:, 0].mean() for s in seen]), np.array([s[:, 1].min() for s in seen]),
                                np.array([s[:, 2].min() for s in seen]))
            bw = np.array([s[:, 3].mean() for s in seen])
        at = {n: i for i, n in enumerate(names)}
        return tuple(replace(d, flops=float(flops[at[d.name]]), capacity=int(cap[at[d.name]]),
                             hard_capacity=int(hard[at[d.name]]), bandwidth=float(bw[at[d.name]]))
                     if d.alive else d for d in devices)
