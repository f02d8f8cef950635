"""Websocket transport: one aiohttp websocket per agent pair, msgpack frames, never pickle.

Each agent owns a `WsEndpoint`: an aiohttp server (bound to 127.0.0.1 unless the caller
explicitly allows another address) with two routes, `/peer` for the data plane from other
agents and `/control` for the runner, plus a client that dials its peers. Of every pair the
agent whose name sorts first dials; the one connection then carries both directions. A
second connection in the name of a peer that is connected is refused (HTTP 409): a token
holder cannot cut a device off by claiming its name.

Every request carries the run's random token (`Authorization: Bearer ...`) and is refused
(HTTP 401) without it, whatever bytes the header holds; the peer names itself in `X-Agent`
and must be in the address book. A connection that has not completed its request within
`HANDSHAKE_S` is closed, and an open websocket is pinged (`HEARTBEAT_S` of wall-clock time;
a pong missing for half that closes it). The receiving loop yields after every frame, so a
flood on one connection cannot starve the others' pongs. Frames are binary
msgpack (`codec.py`) with an explicit size limit; a frame that is not binary, too large or
undecodable is refused, counted and logged (at most one line per peer and second, see
`refusals.py`); what the frames say is checked by the agent. What waits to be written to a
peer is bounded (`MAX_QUEUED`): beyond it frames are lost, as on a congested network. The emulated link (token bucket + latency) is
applied at the sender exactly as with the in-process transport: a frame is written to the
socket when the link delivers it, so both transports emulate the same network (loopback
adds a few tens of microseconds). Each frame carries the time it was due (`due`, stamped
into a fixed-width field when the link delivers it), so the receiver counts the socket hop
and its own decoding as host time, not as the emulated network's; a stamp from another
host's clock is not plausible and the arrival time is used instead.

Content early (real clock, when the agents compute early: `early` says which messages):
such a frame is written to the socket at once, its `due` field holding -n (n a number of
the sender's), and the emulated link carries it as before, charging the same bytes; when
the link delivers it, only a small arrival marker (`t` "arr", `n`, and the due time) is
written. The receiver keeps the content (at most `MAX_PENDING` per endpoint), hands it to
`previewer` (the agent starts the arithmetic), and passes it to the handler when its
marker arrives, as of the marker's due time. A rate or latency change that moves the
arrival moves the marker, so the link model is exactly as without it; one connection per
pair keeps every content ahead of its marker. A frame whose `due` is -inf is content only
(`send_early`: a result known before its job's window ends; the frame follows as usual).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from ..emulation.clock import from_wall
from ..emulation.link import EmulatedLink
from ..scenario.records import LinkSpec
from .codec import MAX_FRAME, EncodeOnce, FrameError, decode, encode
from .refusals import Refusals

log = logging.getLogger(__name__)

Handler = Callable[[str, dict[str, Any], float | None], None]  # (sender, message, arrival)
ControlHandler = Callable[[web.Request, web.WebSocketResponse], Awaitable[None]]

LOOPBACK = "127.0.0.1"
HEARTBEAT_S = 5.0  # wall seconds between pings (a busy host must still answer within half)
HANDSHAKE_S = 10.0  # wall seconds a connection may take to send its request
MAX_QUEUED = 256 * 1024 * 1024  # bytes waiting for one peer's socket
MAX_PENDING = 4096  # contents received early whose arrival is still ahead (per endpoint)
ARRIVAL = "arr"  # the marker that a frame sent early has arrived (never reaches the agent)
# frames start with the map entry "due": <float64>: header byte, key, type byte, 8 bytes
_DUE_PREFIX, _DUE_AT = b"\xa3due\xcb", 6
# bytes every frame carries beyond the encoded message (the "due" entry); the cost model
# prices them on every activation frame when a run uses this transport
FRAME_EXTRA = len(encode({"due": 0.0})) - len(encode({}))


def check_bind(host: str, allow_remote: bool) -> None:
    if host not in (LOOPBACK, "localhost", "::1") and not allow_remote:
        raise ValueError(f"refusing to listen on {host}: agents bind {LOOPBACK} unless remote "
                         "addresses are allowed explicitly (--allow-remote)")


def authorized(request: web.Request, token: str) -> bool:
    # header bytes that are not UTF-8 reach us as surrogate escapes: compare them as bytes
    got = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    return hmac.compare_digest(got, f"Bearer {token}".encode())


class WsEndpoint:
    def __init__(self, name: str, token: str, host: str = LOOPBACK, port: int = 0,
                 allow_remote: bool = False, max_frame: int = MAX_FRAME) -> None:
        check_bind(host, allow_remote)
        self.name, self.token, self.host, self.port = name, token, host, port
        self.max_frame = max_frame
        self.loop = asyncio.get_running_loop()
        self.handler: Handler | None = None  # the agent's `handle`
        self.on_peer_down: Callable[[str], None] | None = None
        self.on_fault: Callable[[str, str], None] = lambda where, what: log.warning("%s: %s", where, what)
        self.control: ControlHandler | None = None
        # messages whose receiver acts on them as of their due time (see EmulatedLink.send)
        self.retimed: Callable[[dict[str, Any]], bool] = lambda msg: False
        self.book: dict[str, str] = {}  # peer -> base URL
        self.links: dict[str, EmulatedLink] = {}
        self._ws: dict[str, web.WebSocketResponse | aiohttp.ClientWebSocketResponse] = {}
        self._connected: dict[str, asyncio.Event] = {}
        self._queues: dict[str, asyncio.Queue[bytes]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closing = False
        self.refusals = Refusals(name, log)
        self._queued: dict[str, int] = {}  # bytes waiting per peer socket
        self.lost_frames = 0
        # a message sent to several peers is encoded once, with a place for its due time
        self._encode = EncodeOnce(lambda msg: encode({"due": 0.0, **msg}))
        # `--links kernel`: the kernel's token-bucket filters shape the bytes on veth pairs
        # (testbed/harness/kernel.py); the emulated link keeps only the sender's accounts
        # (telemetry, rate alarms) and its latency, added before the frame is written, and
        # the receiver takes a frame's real arrival, not the time the emulation says it is due
        self.kernel_links = False
        self._kernel_last: dict[str, float] = {}  # per peer: the last frame's write time (FIFO)
        # content early (see the module's doc): which messages go ahead of their frames (None:
        # none), who gets their content on receipt, and the contents waiting for their markers
        self.early: Callable[[dict[str, Any]], bool] | None = None
        self.previewer: Callable[[str, dict[str, Any]], None] | None = None
        self._early_n = 0
        self._pending: dict[tuple[str, int], dict[str, Any]] = {}

    @property
    def refused(self) -> int:
        return self.refusals.total

    @property
    def serving(self) -> bool:
        """Whether `start` has run: the endpoint accepts its peers."""
        return self._runner is not None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> int:
        app = web.Application(client_max_size=1024)
        app.router.add_get("/peer", self._serve_peer)
        app.router.add_get("/control", self._serve_control)
        # aiohttp's keep-alive timer also closes a connection that never sends a request
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     keepalive_timeout=from_wall(HANDSHAKE_S, self.loop))
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the port chosen for port 0
        self._session = aiohttp.ClientSession()
        return self.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for ws in list(self._ws.values()):
            await ws.close()
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ peers

    def add_peer(self, name: str, url: str, link: LinkSpec) -> None:
        """Know a peer (its address and our emulated link to it)."""
        self.book[name] = url
        self.links[name] = EmulatedLink(self.name, name, link.bandwidth_mbps, link.latency_ms,
                                        link.burst_kib, self.loop)
        self._connected.setdefault(name, asyncio.Event())

    async def connect(self, peers: list[str] | None = None, timeout: float = 30.0) -> None:
        """Dial the peers (default: every peer in the book) that sort after us; wait until
        each of them is connected (a peer that sorts first dials us) for `timeout` seconds
        of wall-clock time."""
        want = [p for p in (self.book if peers is None else peers) if p != self.name and p in self.book]
        for peer in want:
            if self.name < peer and peer not in self._ws:
                self._spawn(self._dial(peer))
        try:
            await asyncio.wait_for(asyncio.gather(*(self._connected[p].wait() for p in want)),
                                   from_wall(timeout, self.loop))
        except TimeoutError:
            missing = [p for p in want if not self._connected[p].is_set()]
            raise ConnectionError(f"{self.name}: no connection to {', '.join(missing)} within {timeout:g} s") from None

    def _heartbeat(self) -> float | None:
        """The ping interval of a peer connection. None with kernel links: their pings queue
        behind the data in the shaped qdisc (at a dilated rate a migration holds the link for
        minutes), so a late pong would say the link is busy, not that the peer hangs; the
        runner's unshaped control connection still finds an agent that hangs."""
        return None if self.kernel_links else from_wall(HEARTBEAT_S, self.loop)

    async def _dial(self, peer: str) -> None:
        assert self._session is not None
        delay = 0.05
        for attempt in range(40):
            try:
                ws = await self._session.ws_connect(
                    self.book[peer] + "/peer", max_msg_size=self.max_frame, heartbeat=self._heartbeat(),
                    headers={"Authorization": f"Bearer {self.token}", "X-Agent": self.name})
                break
            except (aiohttp.ClientError, OSError) as e:
                if attempt == 39:
                    self.on_fault(f"{self.name}->{peer}", f"cannot connect: {e}")
                    return
                await asyncio.sleep(from_wall(delay, self.loop))
                delay = min(1.0, delay * 2)
        await self._serve(peer, ws)

    async def _serve_peer(self, request: web.Request) -> web.StreamResponse:
        peer = request.headers.get("X-Agent", "")
        if not authorized(request, self.token):
            self._refuse("?", "connection without the run token", "peer")
            return web.Response(status=401, text="missing or wrong run token")
        if peer not in self.book or peer == self.name:
            self._refuse("?", f"connection from an unknown agent {peer[:64]!r}", "peer")
            return web.Response(status=403, text="unknown agent")
        live = self._ws.get(peer)
        if live is not None and not live.closed:  # a second connection claiming a connected peer
            self._refuse(peer, "a second connection while one is open", "peer")
            return web.Response(status=409, text="already connected")
        ws = web.WebSocketResponse(max_msg_size=self.max_frame, heartbeat=self._heartbeat())
        await ws.prepare(request)
        await self._serve(peer, ws)
        return ws

    async def _serve(self, peer: str, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
        old = self._ws.get(peer)
        if old is not None and not old.closed:
            await old.close()
        self._ws[peer] = ws
        queue = self._queues.setdefault(peer, asyncio.Queue())
        writer = self._spawn(self._write_loop(peer, ws, queue))
        self._connected.setdefault(peer, asyncio.Event()).set()
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    self._receive(peer, msg.data, self.loop.time())
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    self._refuse(peer, f"websocket error: {ws.exception()}")
                    break
                else:
                    self._refuse(peer, f"non-binary frame ({msg.type.name})")
                # frames already queued are read without suspending: let the other
                # connections (and their heartbeats) in between
                await asyncio.sleep(0)
        finally:
            writer.cancel()
            if self._ws.get(peer) is ws:
                del self._ws[peer]
                self._connected[peer] = asyncio.Event()
                if not self._closing and self.on_peer_down is not None:
                    self.on_peer_down(peer)

    def _refuse(self, peer: str, why: str, kind: str = "frame") -> None:
        """Counted and logged (rate-limited), never a fault: the agent goes on."""
        self.refusals.refuse(peer, kind, why, self.loop.time())

    def _receive(self, peer: str, frame: bytes, arrived: float) -> None:
        try:
            msg = decode(frame, self.max_frame)
        except FrameError as e:
            self._refuse(peer, str(e))
            return
        due = msg.pop("due", None)
        if isinstance(due, float) and due < 0:
            self._content(peer, msg, due)
            return
        if msg.get("t") == ARRIVAL:
            n = msg.get("n")
            if not isinstance(n, int) or isinstance(n, bool):
                self._refuse(peer, f"an arrival marker without a number ({type(n).__name__})")
                return
            content = self._pending.pop((peer, n), None)
            if content is None:  # its content was dropped here (beyond MAX_PENDING): the frame is lost
                self.lost_frames += 1
                log.info("%s->%s: arrival %d of content no longer held", peer, self.name, n)
                return
            msg = content
        if not self.kernel_links and isinstance(due, float) and arrived - 1.0 <= due <= arrived:
            arrived = due  # the socket hop and the decoding are the host's, not the link's
        if self.handler is None:
            return
        try:
            self.handler(peer, msg, arrived)  # the agent checks the message (and counts refusals)
        except Exception as e:  # a bug in the agent: it must surface, and the agent go on
            log.exception("%s: handling %r from %s failed", self.name, msg.get("t"), peer)
            self.on_fault(f"{peer}->{self.name}", f"handling {msg.get('t')!r} failed: {type(e).__name__}: {e}")

    def _content(self, peer: str, msg: dict[str, Any], due: float) -> None:
        """A frame's content ahead of its arrival: kept for its marker (unless it is
        content only), and previewed."""
        if due != -math.inf:
            if not due.is_integer() or due < -2.0 ** 53:
                self._refuse(peer, f"content early with a bad number {due!r}")
                return
            if len(self._pending) >= MAX_PENDING:  # bounded: the oldest goes (its arrival, if it comes, is lost)
                self._pending.pop(next(iter(self._pending)))
            self._pending[(peer, int(-due))] = msg
        if self.previewer is not None:
            try:
                self.previewer(peer, msg)
            except Exception:  # the arithmetic early is an optimisation: its frame still arrives
                log.exception("%s: previewing %r from %s failed", self.name, msg.get("t"), peer)

    async def _write_loop(self, peer: str, ws: Any, queue: asyncio.Queue[bytes]) -> None:
        while True:
            frame = await queue.get()
            try:
                await ws.send_bytes(frame)
            except (ConnectionError, RuntimeError, aiohttp.ClientError) as e:
                self.lost_frames += 1
                log.info("%s->%s: frame lost: %s", self.name, peer, e)
            finally:
                self._queued[peer] = self._queued.get(peer, 0) - len(frame)

    # ------------------------------------------------------------------ sending

    def send(self, dst: str, msg: dict[str, Any], at: float | None = None) -> int:
        """Queue msg for dst through our emulated link, handed over at emulated time `at`
        (default now); returns the bytes charged."""
        if dst == self.name:
            self.loop.call_soon(self._local, msg, at)
            return 0
        frame = bytearray(self._encode(msg))  # a copy: its due time is written in at hand-over
        link = self.links.get(dst)
        if link is None:
            self.lost_frames += 1
            self.on_fault(f"{self.name}->{dst}", f"no link to {dst}: a {msg.get('t')!r} message was dropped")
            return 0
        if self.kernel_links:
            link.send(frame, lambda f: None, at, self.retimed(msg))  # type: ignore[arg-type]  # the accounts only
            now = self.loop.time()
            write = max((now if at is None else min(at, now)) + link.latency, self._kernel_last.get(dst, now))
            self._kernel_last[dst] = write
            self.loop.call_at(write, self._put, dst, frame, write)
            return len(frame)
        if self.early is not None and self.early(msg) and self._room(dst, len(frame)):
            self._early_n += 1
            n = self._early_n
            self._put(dst, bytearray(frame), -float(n))  # the content now; the link carries the frame
            link.send(frame, lambda f: self._arrived(dst, n, link.due), at, self.retimed(msg))  # type: ignore[arg-type]  # as below
            return len(frame)
        link.send(frame, lambda f: self._put(dst, f, link.due), at, self.retimed(msg))  # type: ignore[arg-type]  # link.due is set by the send that calls back
        return len(frame)

    def send_early(self, dst: str, msg: dict[str, Any]) -> None:
        """Content only, to dst's previewer at once (no link, no arrival): a result known
        before its job's window ends, whose frame is sent when it ends."""
        if dst != self.name and dst in self.links and self._room(dst, 0):
            self._put(dst, bytearray(self._encode(msg)), -math.inf)

    def _arrived(self, dst: str, n: int, due: float) -> None:
        """The link delivered a frame whose content went ahead: its arrival marker."""
        self._put(dst, bytearray(encode({"due": 0.0, "t": ARRIVAL, "n": n})), due)

    def _room(self, dst: str, size: int) -> bool:
        return dst in self._ws and dst in self._queues and self._queued.get(dst, 0) + size <= MAX_QUEUED

    def _local(self, msg: dict[str, Any], at: float | None) -> None:
        if self.handler is not None:
            self.handler(self.name, msg, at)

    def _put(self, dst: str, frame: bytearray, due: float) -> None:
        q = self._queues.get(dst)
        if q is None or dst not in self._ws:
            self.lost_frames += 1  # the peer is gone: lost, as on a real network
            return
        if self._queued.get(dst, 0) + len(frame) > MAX_QUEUED:
            self.lost_frames += 1  # the peer does not read: its socket's backlog is bounded
            return
        if frame[1:_DUE_AT] == _DUE_PREFIX:
            struct.pack_into(">d", frame, _DUE_AT, due)
        self._queued[dst] = self._queued.get(dst, 0) + len(frame)
        q.put_nowait(bytes(frame))

    # ------------------------------------------------------------------ control

    async def _serve_control(self, request: web.Request) -> web.StreamResponse:
        if not authorized(request, self.token):
            self._refuse("?", "control connection without the run token", "control")
            return web.Response(status=401, text="missing or wrong run token")
        if self.control is None:
            return web.Response(status=404, text="no control interface")
        ws = web.WebSocketResponse(max_msg_size=self.max_frame, heartbeat=from_wall(HEARTBEAT_S, self.loop))
        await ws.prepare(request)
        await self.control(request, ws)
        return ws
