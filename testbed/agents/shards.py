"""The FFN-shard join: per attempt and layer, what the device of a layer's ffn shard 0 waits
for before the layer's output goes on: the FFN input (the residual), and the partial
output of every shard, as sums over the shards each device holds. Entries are bounded per
contributing peer. Pure: no IO, no asyncio (tensors are only kept and added).

The layer's output is residual + the partial sums in the order of their first shard, so a
placement decides only how the shards' contributions are grouped, not which arithmetic
runs (the reference adds the shards one by one: the same sum, up to rounding)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..model.blocks import sum_partials
from .admission import Quota
from .errors import ProtocolError

Key = tuple[int, int]  # (attempt, layer)


@dataclass
class ShardInputs:
    residual: torch.Tensor | None = None
    parts: dict[int, torch.Tensor] = field(default_factory=dict)  # first shard -> partial sum
    covered: set[int] = field(default_factory=set)
    due: float | None = None
    by: set[str] = field(default_factory=set)

    def complete(self, shards: int) -> bool:
        return self.residual is not None and len(self.covered) >= shards

    def output(self) -> torch.Tensor:
        assert self.residual is not None
        return self.residual + sum_partials([self.parts[k] for k in sorted(self.parts)])


class ShardJoin:
    """The pending sums of ffn shards on one device, keyed by (attempt, layer); a peer may
    contribute to at most `quota` of them (ProtocolError beyond)."""

    def __init__(self, shards: int, quota: int) -> None:
        self.shards = shards
        self.quota = Quota(quota, "{sender} already contributes to {limit} pending FFN sums here")
        self._pending: dict[Key, ShardInputs] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def _entry(self, key: Key, sender: str, at: float | None) -> ShardInputs:
        entry = self._pending.get(key)
        if entry is None or sender not in entry.by:
            self.quota.check(sender)
            if entry is None:
                entry = self._pending[key] = ShardInputs()
            entry.by.add(sender)
            self.quota.take(sender)
        if at is not None:
            entry.due = at if entry.due is None else max(entry.due, at)
        return entry

    def add_residual(self, key: Key, sender: str, at: float | None, x: torch.Tensor) -> None:
        self._entry(key, sender, at).residual = x

    def add_partial(self, key: Key, sender: str, at: float | None, shards: Sequence[int], x: torch.Tensor) -> None:
        """The sum of the partial outputs of `shards` (ProtocolError if any is in already)."""
        entry = self._entry(key, sender, at)
        if entry.covered & set(shards):
            raise ProtocolError(f"ffn shards {sorted(entry.covered & set(shards))} of layer {key[1]} arrived twice")
        entry.parts[min(shards)] = x
        entry.covered.update(shards)

    def ready(self, key: Key) -> bool:
        entry = self._pending.get(key)
        return entry is not None and entry.complete(self.shards)

    def take(self, key: Key) -> ShardInputs:
        entry = self._pending.pop(key)
        for peer in entry.by:
            self.quota.give(peer)
        return entry

    def drop_through(self, floor: float = math.inf) -> None:
        for key in [k for k in self._pending if k[0] <= floor]:
            self.take(key)
