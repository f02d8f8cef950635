"""The projection join: per attempt and layer, the inputs `proj` waits for (the residual,
the layer's input, and the output of every head group) and when the last of them was due.
Entries are bounded per contributing peer. Pure: no IO, no asyncio (tensors are only
sliced and kept)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .admission import Quota

Key = tuple[int, int]  # (attempt, layer)


@dataclass
class ProjInputs:
    """What has arrived for one (attempt, layer): the residual, the outputs by head group,
    when the last input was due (None: now), and the peers that contributed."""

    residual: torch.Tensor | None = None
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    due: float | None = None
    by: set[str] = field(default_factory=set)

    def add_outputs(self, groups: Sequence[int], out: torch.Tensor, width: int) -> None:
        """`out` holds the groups' outputs side by side, `width` columns each."""
        for i, g in enumerate(groups):
            self.outputs[g] = out[:, i * width:(i + 1) * width]

    def complete(self, groups: int) -> bool:
        return self.residual is not None and len(self.outputs) >= groups


class ProjectionJoin:
    """The pending inputs of `proj` on one device, keyed by (attempt, layer); a peer may
    contribute to at most `quota` of them (ProtocolError beyond)."""

    def __init__(self, groups: int, width: int, quota: int) -> None:
        self.groups, self.width = groups, width
        self.quota = Quota(quota, "{sender} already contributes to {limit} pending inputs here")
        self._pending: dict[Key, ProjInputs] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._pending))

    def entry(self, key: Key, sender: str, at: float | None) -> ProjInputs:
        """The inputs of `key`, with `sender` among its contributors; `at` (when this input
        was due) moves the entry's due time later, never earlier."""
        entry = self._pending.get(key)
        if entry is None or sender not in entry.by:
            self.quota.check(sender)
            if entry is None:
                entry = self._pending[key] = ProjInputs()
            entry.by.add(sender)
            self.quota.take(sender)
        if at is not None:
            entry.due = at if entry.due is None else max(entry.due, at)
        return entry

    def add_residual(self, key: Key, sender: str, at: float | None, x: torch.Tensor) -> None:
        self.entry(key, sender, at).residual = x

    def add_outputs(self, key: Key, sender: str, at: float | None, groups: Sequence[int], out: torch.Tensor) -> None:
        self.entry(key, sender, at).add_outputs(groups, out, self.width)

    def ready(self, key: Key) -> bool:
        entry = self._pending.get(key)
        return entry is not None and entry.complete(self.groups)

    def take(self, key: Key) -> ProjInputs:
        """Remove the entry of `key` (its contributors' quota is freed) and return it."""
        entry = self._pending.pop(key)
        for peer in entry.by:
            self.quota.give(peer)
        return entry

    def drop_through(self, floor: float = math.inf) -> None:
        """Drop every entry of an attempt at or below `floor`."""
        for key in [k for k in self._pending if k[0] <= floor]:
            self.take(key)
