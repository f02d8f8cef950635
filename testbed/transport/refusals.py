"""Refused messages: counted, and logged at most once per peer and kind per second (pure).

Every receiver that checks what arrives (a device agent, the controller, a websocket
endpoint, an agent's control channel) keeps a `Refusals`: a refusal is counted (by kind, in
`total`) and logged, but a flood of them writes one line per (peer, kind) and second, with
how many were refused since that pair's previous line, instead of one line each. Time is
passed in (`now`, the caller's clock), so the same code runs on the real and the virtual
clock. Peers and kinds are whatever the caller names them; callers bound both (names from
the run's address book, kinds from the protocol's table), so the memory kept is bounded.
"""

from __future__ import annotations

import logging
from collections import Counter

INTERVAL_S = 1.0


class Refusals:
    def __init__(self, where: str, log: logging.Logger, interval: float = INTERVAL_S) -> None:
        self.where, self.log, self.interval = where, log, interval
        self.total = 0
        self.by_kind: Counter[str] = Counter()
        self._last: dict[tuple[str, str], list[float]] = {}  # (peer, kind) -> [logged at, not logged since]

    def refuse(self, peer: str, kind: str, why: str, now: float) -> None:
        self.total += 1
        self.by_kind[kind] += 1
        key = (peer, kind)
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            last[1] += 1
            return
        since = f" (and {int(last[1])} more since the previous line)" if last is not None and last[1] else ""
        self.log.warning("%s: refused %s from %s: %s%s", self.where, kind, peer, why, since)
        self._last[key] = [now, 0]
