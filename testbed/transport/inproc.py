"""In-process transport: every ordered device pair is an `EmulatedLink`; frames are the
real msgpack encoding (so links charge real frame sizes) and are decoded on delivery.

Owns delivery to registered agents and the list of links. Messages between an agent and
itself (co-located blocks, the controller and its source device) are free and skip the
codec. A frame that does not decode, or a message for an agent that is gone, is dropped
and reported to `on_fault`; a handler that raises is reported the same way. Nothing here
knows what messages mean.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ..emulation.clock import from_wall
from ..emulation.link import EmulatedLink
from ..scenario.records import LinkSpec
from .codec import EncodeOnce, FrameError, decode

log = logging.getLogger(__name__)

Handler = Callable[[str, dict[str, Any], float | None], None]  # (sender, message, due time)


class InprocNetwork:
    def __init__(self, loop: asyncio.AbstractEventLoop | None = None,
                 on_fault: Callable[[str, str], None] | None = None, frame_extra: int = 0) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.frame_extra = frame_extra  # bytes every link charges beyond a frame's own (`EmulatedLink`)
        self.links: dict[tuple[str, str], EmulatedLink] = {}
        self.handlers: dict[str, Handler] = {}
        self.on_fault = on_fault or (lambda where, what: log.warning("%s: %s", where, what))
        # fault injection (tests, scenarios): a frame for which this returns True is lost
        self.drop: Callable[[str, str, dict[str, Any]], bool] | None = None
        self.dead: set[str] = set()  # failed agents: frames to or from them are lost
        # messages whose receiver acts on them as of their due time (see EmulatedLink.send)
        self.retimed: Callable[[dict[str, Any]], bool] = lambda msg: False
        self.lost_frames = 0
        self._encode = EncodeOnce()  # a message sent to several devices is encoded once
        # content early (real clock): each agent's `preview` gets a frame's message as soon
        # as it is sent; the frame still arrives, and is acted on, at its emulated time
        self.previews: dict[str, Callable[[str, dict[str, Any]], None]] = {}

    def add_link(self, src: str, dst: str, spec: LinkSpec) -> EmulatedLink:
        link = EmulatedLink(src, dst, spec.bandwidth_mbps, spec.latency_ms, spec.burst_kib, self.loop)
        link.frame_extra = self.frame_extra
        self.links[(src, dst)] = link
        return link

    def link(self, src: str, dst: str) -> EmulatedLink:
        return self.links[(src, dst)]

    def register(self, name: str, handler: Handler) -> None:
        self.handlers[name] = handler

    def unregister(self, name: str) -> None:
        self.handlers.pop(name, None)
        self.previews.pop(name, None)

    def kill(self, name: str) -> None:
        """An agent dies: it receives nothing more and what it was sending is lost."""
        self.dead.add(name)
        self.handlers.pop(name, None)
        self.previews.pop(name, None)
        for (src, _), link in self.links.items():
            if src == name:
                self.lost_frames += link.drop_all()

    def send(self, src: str, dst: str, msg: dict[str, Any], at: float | None = None) -> int:
        """Queue msg from src to dst, handed over at emulated time `at` (default now);
        returns the bytes charged to the link (0 if local). The handler gets the time the
        message was due."""
        if src in self.dead:
            self.lost_frames += 1
            return 0
        if src == dst:
            self.loop.call_soon(self._call, src, dst, msg, at)
            return 0
        frame = self._encode(msg)
        link = self.links[(src, dst)]
        if self.drop is not None and self.drop(src, dst, msg):
            link.send(frame, lambda f: None, at)  # it costs the link, then vanishes
            return len(frame)
        link.send(frame, lambda f: self._deliver(src, dst, f, link.due), at, self.retimed(msg))
        self.preview(src, dst, msg)
        return len(frame)

    SETTLE_LIMIT_WALL_S = 1.0  # a loop that cannot catch up within this is left to the lateness counts

    async def settle(self, t: float) -> None:
        """Return once every frame due by emulated time `t` has been delivered and handled,
        and what those handlers sent that was due by `t` too (real clock: the loop runs
        behind emulated time while the host works; the controller calls this before it acts
        as of `t`, so it sees what its virtual twin would see). Every timer due by `t` runs
        before one set for `t` itself (asyncio runs due timers in time order), so each round
        waits for one: the windows that ended by then, the deliveries due by then; rounds go
        on while a link still holds a frame due by `t` (sent by those handlers)."""
        deadline = self.loop.time() + from_wall(self.SETTLE_LIMIT_WALL_S, self.loop)
        while True:
            fut = self.loop.create_future()
            self.loop.call_at(t, _done, fut)
            await fut
            if not any(link.due_by(t) for link in self.links.values()) or self.loop.time() > deadline:
                break
        for _ in range(3):  # what those handlers started: a message to the agent itself (the
            await asyncio.sleep(0)  # controller's port) is a call_soon, an answer wakes a task

    def preview(self, src: str, dst: str, msg: dict[str, Any]) -> None:
        """Hand msg's content to dst ahead of its frame (when dst computes early)."""
        preview = self.previews.get(dst)
        if preview is not None and src not in self.dead:
            self.loop.call_soon(preview, src, msg)

    def _deliver(self, src: str, dst: str, frame: bytes, due: float) -> None:
        try:
            msg = decode(frame)
        except FrameError as e:
            self.on_fault(f"{src}->{dst}", f"dropped a malformed frame: {e}")
            return
        self._call(src, dst, msg, due)

    def _call(self, src: str, dst: str, msg: dict[str, Any], due: float | None = None) -> None:
        handler = self.handlers.get(dst)
        if handler is None and dst in self.dead:
            self.lost_frames += 1  # sent to a device that has failed: lost, as on a real network
            return
        if handler is None:
            self.on_fault(f"{src}->{dst}", f"dropped a {msg.get('t')!r} message: {dst} is not running")
            return
        try:
            handler(src, msg, due)
        except Exception as e:  # an agent bug must surface, not vanish in a loop callback
            log.exception("handler of %s failed on %r", dst, msg.get("t"))
            self.on_fault(dst, f"failed handling {msg.get('t')!r} from {src}: {type(e).__name__}: {e}")


def _done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
