"""Requests from the controller to devices, and their answers.

Owns the request ids and the futures that wait for acknowledgements. A device that does
not answer in time is reported to `on_silent` (the controller treats it as lost) and left
out of the answers; a run failure carried by an answer is raised. An answer is taken only
for a request that waits, from a device it was asked of (a migration is answered by its
destination, or by its source when it cannot send), carrying what that request's answer
carries (`messages.Ack.answers`); anything else is refused (ProtocolError).

Requests leave at the controller's emulated instant (`Timeline`), and waiting for answers
moves that instant to the latest answer's emulated arrival (its due time), not to when the
host handed it over: the next request leaves as of then on both clocks.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from .errors import ProtocolError, RunFailed
from .parts import Port
from .timeline import Timeline

if TYPE_CHECKING:  # (the protocol's records hold tensors: this part stays torch-free)
    from .messages import Ack, Message

# a request as its sender states it: the record, given the request id this part assigns
Make = Callable[[int], "Message"]


class Requests:
    def __init__(self, port: Port, loop: asyncio.AbstractEventLoop, timeout_s: float,
                 on_silent: Callable[[str, str], None], timeline: Timeline | None = None) -> None:
        self.port, self.loop, self.timeout_s, self.on_silent = port, loop, timeout_s, on_silent
        self.timeline = timeline or Timeline(loop)
        self._due: dict[asyncio.Future[Ack], float] = {}  # an answer's emulated arrival
        self._rid = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future[Ack]]] = {}
        self._asked: dict[int, tuple[str, frozenset[str]]] = {}  # rid -> (request, who may answer)

    def request(self, dev: str, make: Make) -> asyncio.Future[Ack]:
        rid = next(self._rid)
        msg = make(rid)
        fut: asyncio.Future[Ack] = self.loop.create_future()
        self._pending[rid] = (dev, fut)
        self._asked[rid] = (msg.KIND, msg.answered_by(dev))
        fut.add_done_callback(lambda _: self._asked.pop(rid, None))
        self.port.send(dev, msg.wire(), self.timeline.now())
        return fut

    async def wait(self, futs: Collection[asyncio.Future[Ack]], timeout: float,
                   move: bool = True) -> tuple[set[asyncio.Future[Ack]], float]:
        """Wait for `futs` (at most `timeout` emulated seconds); returns those still
        pending, and the emulated instant the wait ended: the latest answer's due time, or
        the end of the timeout when one is missing. `move`: the controller waited for them
        (its instant moves there); a background round does not move it."""
        start = self.timeline.now()
        try:
            _, pending = await asyncio.wait(futs, timeout=timeout)
        finally:
            dues = [self._due.pop(f, None) for f in futs]
        if pending:
            end = start + timeout
        elif any(d is None for d in dues):  # failed, not answered: the host noticed it now
            end = self.loop.time()
        else:
            end = max((d for d in dues if d is not None), default=start)
        if move:
            self.timeline.reach(end)
        return pending, end

    async def ask(self, requests: dict[str, Make], what: str, timeout: float | None = None) -> dict[str, Ack]:
        """Send one request per device and wait for the answers. A device that does not
        answer in time is unreachable: it is treated as lost and left out of the result."""
        return (await self.ask_at(requests, what, timeout))[0]

    async def ask_at(self, requests: dict[str, Make], what: str, timeout: float | None = None,
                     move: bool = True) -> tuple[dict[str, Ack], float]:
        """`ask`, with the emulated instant the answers were all in (`wait`)."""
        futs = {d: self.request(d, m) for d, m in requests.items()}
        if not futs:
            return {}, self.timeline.now()
        pending, end = await self.wait(list(futs.values()), timeout or self.timeout_s, move)
        out = {}
        for d, f in futs.items():
            if f in pending:
                f.cancel()
                self.on_silent(d, f"no answer to {what} within {timeout or self.timeout_s:g} s")
            elif f.exception() is None:
                out[d] = f.result()
            elif isinstance(f.exception(), RunFailed):
                raise f.exception()  # type: ignore[misc]  # checked just above: a RunFailed, not None
        return out, end

    def answered(self, m: Ack, sender: str, due: float | None = None) -> None:
        """An acknowledgement arrived from `sender` (checked: ProtocolError if refused),
        due at emulated time `due` (None: now)."""
        asked = self._asked.get(m.rid)
        if asked is None:
            raise ProtocolError(f"'ack' from {sender} to no request that waits (rid {m.rid})")
        request, who = asked
        if sender not in who:
            raise ProtocolError(f"'ack' to {request!r} from {sender}, which was not asked")
        m.answers(request)
        entry = self._pending.pop(m.rid, None)
        if entry is not None and not entry[1].done():
            self._due[entry[1]] = self.loop.time() if due is None else due
            entry[1].set_result(m)

    def fail_device(self, device: str, err: Exception) -> None:
        """Everything that waits on `device` fails with `err`."""
        for rid, (dev, fut) in list(self._pending.items()):
            if dev == device and not fut.done():
                fut.set_exception(err)
                self._pending.pop(rid, None)

    def fail_all(self, err: Exception) -> None:
        for _, fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)

    def cancel(self) -> None:
        """Answer nothing more."""
        for _, fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        self._due.clear()
