"""Per-sender quotas: what a peer can make a device hold (jobs queued on its behalf,
pending inputs of `proj` it contributes to) is bounded per peer. Pure: no IO, no asyncio."""

from __future__ import annotations

from collections import Counter

from .errors import ProtocolError


class Quota:
    """At most `limit` units held per sender; `refusal` says so (a format string with
    {sender} and {limit})."""

    def __init__(self, limit: int, refusal: str) -> None:
        self.limit, self.refusal = limit, refusal
        self._held: Counter[str] = Counter()

    def check(self, sender: str) -> None:
        """ProtocolError if `sender` holds its whole quota already."""
        if self._held[sender] >= self.limit:
            raise ProtocolError(self.refusal.format(sender=sender, limit=self.limit))

    def take(self, sender: str) -> None:
        self._held[sender] += 1

    def give(self, sender: str) -> None:
        self._held[sender] -= 1
        if self._held[sender] <= 0:
            del self._held[sender]

    def held(self, sender: str) -> int:
        return self._held[sender]
