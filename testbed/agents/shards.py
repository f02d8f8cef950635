"""The FFN-shard join: per attempt and layer, what the device of a layer's ffn shard 0 waits
for before the layer's output goes on: the FFN input (the residual), and the partial
output of every shard, as sums over the shards each device holds. Entries are bounded per
contributing peer. `EarlySums`: the same sums from content that arrived ahead of its frames
(computing early, real clock). Pure: no IO, no asyncio (tensors are only kept and added).

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


@dataclass
class _Early:
    inputs: ShardInputs = field(default_factory=ShardInputs)
    groups: dict[int, frozenset[int]] = field(default_factory=dict)  # first shard -> the shards its sum covers


class EarlySums:
    """The same sums as `ShardJoin`, from content that arrived ahead of its frames (a device
    computing early, holding a layer's shard 0): the residual and the partial sums per
    (attempt, layer), and the complete `ShardInputs` as soon as they are all there (its
    `output()` is the arithmetic the sum at arrival runs, so the same bits).

    Content only: nothing is committed from it (whoever uses the sum compares it with the
    frames that arrive), so no peer is held to a quota; at most `limit` sums are kept, the
    oldest dropped first. The same content twice (a result handed on when its arithmetic is
    done, then when its window opens) completes a sum once; other content for shards that
    are in (computed again, or grouped otherwise since) replaces theirs, and a complete sum
    whose content changes is complete again."""

    def __init__(self, shards: int, limit: int) -> None:
        self.shards, self.limit = shards, limit
        self._sums: dict[Key, _Early] = {}

    def __len__(self) -> int:
        return len(self._sums)

    def _entry(self, key: Key) -> _Early:
        entry = self._sums.get(key)
        if entry is None:
            if len(self._sums) >= self.limit:
                del self._sums[next(iter(self._sums))]
            entry = self._sums[key] = _Early()
        return entry

    def add_residual(self, key: Key, x: torch.Tensor) -> ShardInputs | None:
        """The layer's FFN input; the sum if this completes it (or changes a complete one)."""
        entry = self._entry(key)
        if entry.inputs.residual is not None and _same(entry.inputs.residual, x):
            return None
        entry.inputs.residual = x
        return self._complete(entry)

    def add_partial(self, key: Key, shards: Sequence[int], x: torch.Tensor) -> ShardInputs | None:
        """The sum of the partial outputs of `shards`; the sum if this completes it (or
        changes a complete one)."""
        entry, mine = self._entry(key), frozenset(shards)
        first = min(mine)
        if entry.groups.get(first) == mine and _same(entry.inputs.parts[first], x):
            return None
        for k in [k for k, g in entry.groups.items() if g & mine]:
            del entry.groups[k], entry.inputs.parts[k]
        entry.groups[first] = mine
        entry.inputs.parts[first] = x
        entry.inputs.covered = set().union(*entry.groups.values())
        return self._complete(entry)

    def _complete(self, entry: _Early) -> ShardInputs | None:
        return entry.inputs if entry.inputs.complete(self.shards) else None

    def forget(self, key: Key) -> None:
        """The sum was made from the frames (`ShardJoin`): no content for it is to come."""
        self._sums.pop(key, None)

    def drop_through(self, floor: float = math.inf) -> None:
        for key in [k for k in self._sums if k[0] <= floor]:
            del self._sums[key]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))
