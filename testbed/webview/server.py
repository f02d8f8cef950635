"""HTTP server of the view: the page at `/`, the state at `/api/state`, updates pushed at
`/api/stream` (server-sent events), for a `Feed` (state.py).

It runs in a thread of its own with its own asyncio loop: the run's loop keeps emulated
time (dilated, or virtual and jumping), in which an HTTP server's timeouts and the push
interval would mean nothing, and the run's loop must not spend its emulated windows on
serving pages. The thread only reads the feed, every `PUSH_S`, and only while a page is
connected. It binds 127.0.0.1 by default; bound to any other address it requires the
run's token (`?token=` in the URL, or `Authorization: Bearer TOKEN`; a bare token is not
a bearer token), as the agents do (testbed/transport/ws.py). Loopback is not a trust
boundary for browsers: a page on another site can make the browser send requests to
127.0.0.1 under its own name (DNS rebinding), so without a token only requests whose
`Host` names loopback are served (HTTP 421 otherwise).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import threading
import time
from typing import Any

from aiohttp import web

from .page import render
from .state import Cursor, Feed

PUSH_S = 0.25  # how often a connected page is sent what is new (4 updates a second at most)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def loopback_host(value: str | None) -> bool:
    """Whether a Host header names loopback: 127.0.0.1, localhost or [::1], any port."""
    if not value:
        return False
    v = value.strip().lower()
    if v.startswith("["):  # [::1] or [::1]:8765
        name, sep, rest = v[1:].partition("]")
        return bool(sep) and name == "::1" and (rest == "" or (rest[0] == ":" and rest[1:].isdigit()))
    name, _, port = v.partition(":")
    return name in ("127.0.0.1", "localhost") and (port == "" or port.isdigit()) and v.count(":") <= 1


def bearer(header: str) -> str:
    """The token of an `Authorization: Bearer TOKEN` header ("" for anything else)."""
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), allow_nan=False)


class ViewServer:
    """Serves `feed`; `start()` returns the URL to open, `stop()` lets the connected pages
    take what is left and closes."""

    def __init__(self, feed: Feed, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None) -> None:
        self.feed, self.host, self.port = feed, host, port
        # loopback: any local user could read the results files anyway; elsewhere the token
        self.token = token if token else (None if host in LOOPBACK else secrets.token_urlsafe(24))
        self.url = ""
        self.streams = 0  # pages connected now
        self.served = 0  # pages connected since the start
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._closing = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        """Listen (in a daemon thread); the URL, or OSError (say, the port is taken)."""
        self._thread = threading.Thread(target=self._main, name="webview", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        if not self.url:
            raise OSError(f"the view server did not start on {self.host}:{self.port}")
        return self.url

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._listen())
        except BaseException as e:  # reported to start()'s caller
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._runner.cleanup() if self._runner else asyncio.sleep(0))
            loop.close()

    async def _listen(self) -> None:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/", self._page)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/stream", self._stream)
        # a page still connected when the server stops gets a second to take the last rows
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        # the port the system chose for port 0: aiohttp's runner lists the addresses it serves
        addresses = self._runner.addresses
        self.port = addresses[0][1] if addresses else self.port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def stop(self, linger_s: float = 3.0) -> None:
        """Close; first, for up to `linger_s`, let connected pages take the last updates
        (set `feed.finished` before, so their streams end)."""
        end = time.monotonic() + linger_s
        while self.streams and time.monotonic() < end:
            time.sleep(0.05)
        self._closing = True
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # ------------------------------------------------------------------ handlers

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.token is not None:
            given = request.query.get("token") or bearer(request.headers.get("Authorization", ""))
            if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.token.encode()):
                return web.Response(status=401, text="missing or wrong run token: open the URL the run printed\n")
        elif not loopback_host(request.headers.get("Host")):
            return web.Response(status=421, text="this server answers only requests addressed to 127.0.0.1, "
                                "localhost or [::1] (without a run token)\n")
        return await handler(request)

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=render(None), content_type="text/html",
                            headers={"Cache-Control": "no-store"})

    async def _state(self, request: web.Request) -> web.Response:
        return web.Response(text=dumps(self.feed.snapshot()), content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: `state` (everything so far), then `update`s (what is new),
        then `end` once the feed is finished and all of it was sent."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        self.streams += 1
        self.served += 1
        cursor = Cursor()
        try:
            await self._send(resp, "state", self.feed.snapshot(cursor))
            while not self._closing:
                await asyncio.sleep(PUSH_S)
                delta = self.feed.delta(cursor)
                if delta is not None:
                    await self._send(resp, "update", delta)
                if cursor.finished:
                    await self._send(resp, "end", {})
                    break
        except ConnectionResetError:
            pass  # the page went away
        finally:
            self.streams -= 1
        return resp

    @staticmethod
    async def _send(resp: web.StreamResponse, event: str, data: Any) -> None:
        await resp.write(f"event: {event}\ndata: {dumps(data)}\n\n".encode())
