"""The world of a run whose device agents are separate OS processes (`--processes`).

The runner starts one `python -m runners.agent` per device (or attaches to agents started
by hand on other hosts), talks to each over an authenticated `/control` websocket that the
emulation does not shape, and offers the controller the same interface as the in-process
`Cluster`: a `Port` (the controller's messages leave from the source agent, and what
arrives there for the controller is relayed back), the oracle, instrumentation rows and
scenario events. `fail_device` kills the agent's process; `join_device` starts a new one.

An agent that dies or stops answering for any other reason (killed from outside, crashed,
hung) is a lost device, as with `fail_device`: its control connection closes (or a request
to it times out), the cluster stops asking it for anything and tells the controller
(`on_lost`), which re-places its blocks and replays their caches; the run goes on. The
source device cannot be recovered so: its agent is the controller's port (every message of
the run leaves and arrives through it) and holds the embedding, the LM head and the caches
of the blocks it hosts, and a new one would be a new run's first state, not this run's. So
a lost source ends the run at once as failed, with one line saying why (`on_fault`), and
the run's files are closed as for any failure.

No orphans: every child gets PR_SET_PDEATHSIG, so it dies with the runner even if the
runner is killed; `stop()` (also on failure and Ctrl-C) asks each to stop, then terminates
and kills what is left.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import math
import os
import secrets
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from ..emulation.clock import from_wall
from ..model.spec import ModelSpec
from ..placement.problem import DeviceState, Placement, Snapshot, link_matrices
from ..scenario.records import Event, FailDevice, JoinDevice, Scenario, SetLink, wire_fields
from ..transport.codec import MAX_FRAME, FrameError, decode, encode
from ..transport.ws import FRAME_EXTRA
from .control import TOKEN_ENV
from .kernelworld import KernelWorld
from .rows import DeviceRow, LinkRow
from .world import settle_by_wall

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
STATE_TIMEOUT_S = 20.0  # wall seconds an agent may take to answer the harness before it is lost
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class RelayPort:
    """The controller's port on a source agent in another process."""

    def __init__(self, cluster: ProcessCluster) -> None:
        self.cluster = cluster
        self.source = cluster.source

    def send(self, dst: str, msg: dict[str, Any], at: float | None = None) -> None:
        self.cluster.relay(dst, msg, at)

    def attach(self, handler: Callable[[str, dict[str, Any], float | None], None]) -> None:
        self.cluster.on_relay(handler)

    async def settle(self, t: float) -> None:
        """The frames are in other processes: a little wall time for the hops and the relay."""
        await settle_by_wall(t)


class _Control:
    """One control connection: requests with ids, replies, and relayed messages."""

    def __init__(self, name: str, ws: aiohttp.ClientWebSocketResponse,
                 on_relay: Callable[[str, dict[str, Any], float | None], None], on_close: Callable[[str], None]) -> None:
        self.name, self.ws = name, ws
        self._rid = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._out: asyncio.Queue[bytes] = asyncio.Queue()
        self._sends: list[dict[str, Any]] = []  # controller messages for the next "send" frame
        self.on_relay, self.on_close = on_relay, on_close
        self.loop = asyncio.get_running_loop()
        self._tasks = [self.loop.create_task(self._read()), self.loop.create_task(self._write())]

    def send(self, msg: dict[str, Any]) -> None:
        self._flush()  # controller messages queued before keep their place
        self._out.put_nowait(encode(msg))

    def relay(self, dst: str, msg: dict[str, Any], at: float | None = None) -> None:
        """A controller message to `dst`, leaving from this (source) agent as of emulated
        time `at`. The messages the controller sends in one step of the loop go in one frame,
        which the agent hands to its device in one go: what the device sends itself among
        them (a migration from the source) is handled after all of them, as with a source in
        the controller's process (`AgentPort`). In a frame each, the agent would handle it
        between two frames and put what it sends (the migration's snapshot) on a link ahead
        of the controller's later messages to the same peer, delaying them by its transfer."""
        if not self._sends:
            self.loop.call_soon(self._flush)
        self._sends.append({"dst": dst, "msg": msg, **({"at": at} if at is not None else {})})

    def _flush(self) -> None:
        sends, self._sends = self._sends, []
        if sends:
            self._out.put_nowait(encode({"t": "send", "sends": sends}))

    async def request(self, op: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        """One request to the agent, answered within `timeout` seconds of wall-clock time
        (the harness's own traffic: it does not stretch with the emulated time)."""
        rid = next(self._rid)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        self.send({"t": "op", "op": op, "rid": rid, **fields})
        try:
            reply = await asyncio.wait_for(fut, from_wall(timeout))
        finally:
            self._waiting.pop(rid, None)
        if not reply.get("ok"):
            raise RuntimeError(f"{self.name}: {op} failed: {reply.get('detail')}")
        return reply

    async def _write(self) -> None:
        while True:
            await self.ws.send_bytes(await self._out.get())

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    continue
                try:
                    m = decode(msg.data)
                except FrameError as e:
                    log.warning("control %s: refused a frame: %s", self.name, e)
                    continue
                if m["t"] == "ctl":
                    if not isinstance(m.get("sender"), str) or not isinstance(m.get("msg"), dict):
                        log.warning("control %s: refused a relay without sender and message", self.name)
                        continue
                    at = m.get("at")  # its emulated arrival at the source (a finite number, or none)
                    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
                        at = None
                    try:
                        self.on_relay(m["sender"], m["msg"], at)
                    except Exception:  # the controller's problem, not the connection's
                        log.exception("control %s: relaying %r failed", self.name, m["msg"].get("t"))
                elif m["t"] == "re":
                    fut = self._waiting.get(m.get("rid"))  # type: ignore[arg-type]  # any rid is looked up; an unknown one finds no waiter
                    if fut is not None and not fut.done():
                        fut.set_result(m)
        finally:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"{self.name}: control connection closed"))
            self.on_close(self.name)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.ws.close()


class ProcessCluster:
    frame_extra = FRAME_EXTRA  # the agents talk over the websocket transport

    def __init__(self, scenario: Scenario, model: ModelSpec, on_fault: Callable[[str, str], None],
                 attach: dict[str, str] | None = None, token: str | None = None,
                 on_lost: Callable[[str, str], None] | None = None, links: str = "emulated") -> None:
        self.scenario, self.model, self.on_fault = scenario, model, on_fault
        # a device gone without a scenario event: (device, why) to the controller
        self.on_lost = on_lost or (lambda name, why: on_fault(name, why))
        self.loop = asyncio.get_running_loop()
        self.source = scenario.source
        self.names = [d.name for d in scenario.devices]
        self.failed: set[str] = set()
        self.token = token or os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)
        self.attach = dict(attach or {})  # agents started elsewhere: name -> base URL
        self.urls: dict[str, str] = {}
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self._control: dict[str, _Control] = {}
        self._to_controller: Callable[[str, dict[str, Any], float | None], None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="testbed-run-")
        self._file = Path(self._dir.name) / "scenario.yaml"
        self._file.write_text(yaml.safe_dump(scenario.to_dict(), sort_keys=False))
        self._stopping = False
        self.links = links  # "kernel": namespaces and tbf-shaped veth pairs (kernelworld.py)
        self.kernel: KernelWorld | None = None
        self.peer_urls: dict[str, str] = {}  # where peers reach an agent, if not at self.urls

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.links == "kernel":
            self.kernel = KernelWorld(self.scenario, getattr(self.loop, "time_scale", 1.0))
            self.kernel.up()
        self._session = aiohttp.ClientSession()
        await asyncio.gather(*(self._launch(n) for n in self.names))
        await self._introduce()
        await self._control[self.source].request("attach")

    async def _launch(self, name: str) -> None:
        if name in self.attach:
            self.urls[name] = self.attach[name].rstrip("/")
        else:
            env = {**os.environ, TOKEN_ENV: self.token, "PYTHONPATH": str(ROOT)}
            argv = [sys.executable, "-m", "runners.agent", "--scenario", str(self._file), "--device", name]
            if self.kernel is not None:
                argv = self.kernel.agent_command(name, argv)
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, env=env, cwd=str(ROOT), preexec_fn=_die_with_parent)
            self.procs[name] = proc
            assert proc.stdout is not None
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), from_wall(120))
            except TimeoutError:
                raise RuntimeError(f"agent {name} did not start within 120 s") from None
            if not line.startswith(b"READY "):
                raise RuntimeError(f"agent {name} failed to start (exit {await proc.wait()})")
            self.urls[name] = f"http://127.0.0.1:{int(line.split()[1])}"
            if self.kernel is not None:
                self.urls[name], self.peer_urls[name] = self.kernel.urls(name, int(line.split()[1]))
        assert self._session is not None
        ws = await self._session.ws_connect(self.urls[name] + "/control", max_msg_size=MAX_FRAME,
                                            headers={"Authorization": f"Bearer {self.token}"})
        self._control[name] = _Control(name, ws, self._relay, self._control_closed)
        # one timeline for the run: the agent adopts our time scale and epoch
        await self._control[name].request("clock", time_scale=getattr(self.loop, "time_scale", 1.0),
                                          epoch=getattr(self.loop, "epoch", 0.0))

    async def _introduce(self) -> None:
        """Tell agents about their peers, then have them connect to each other. In two
        rounds: an agent refuses a connection from a name it does not know yet, so every
        agent learns the whole book before any of them dials."""
        book = {n: self.peer_urls.get(n, self.urls[n]) for n in self.names if n not in self.failed}
        for dial in (False, True):
            await asyncio.gather(*(self._control[n].request("peers", peers=book, dial=dial) for n in book))

    def _relay(self, sender: str, msg: dict[str, Any], at: float | None = None) -> None:
        if self._stopping:  # the run is over: agents going away are not news
            return
        if self._to_controller is not None:
            self._to_controller(sender, msg, at)
        if (sender == self.source and msg.get("t") == "down" and msg.get("device") in self.names
                and msg.get("device") != self.source):
            # the source lost its connection to an agent: the controller now treats it as
            # gone; so does the world (a hung process is stopped, never asked again)
            self._lose(msg["device"], "the source lost its connection to it", tell=False)

    def relay(self, dst: str, msg: dict[str, Any], at: float | None = None) -> None:
        """A controller message to `dst`, leaving from the source agent's process as of
        emulated time `at` (the controller's instant; None: when it gets there)."""
        self._control[self.source].relay(dst, msg, at)

    def on_relay(self, handler: Callable[[str, dict[str, Any], float | None], None]) -> None:
        """Where messages the source agent relays for the controller go."""
        self._to_controller = handler

    def _control_closed(self, name: str) -> None:
        if self._stopping or name in self.failed:
            return
        proc = self.procs.get(name)
        if proc is not None and proc.returncode is not None:
            self._lose(name, f"its process ended (exit status {proc.returncode})")
        else:
            self._lose(name, "its control connection closed")

    def _lose(self, name: str, why: str, tell: bool = True) -> None:
        """An agent is gone without a scenario event: never ask it again (a hung process is
        killed, as `fail_device` would) and tell the controller (unless it told us)."""
        if name in self.failed:
            return
        self.failed.add(name)
        proc = self.procs.get(name)
        if proc is not None and proc.returncode is None:
            proc.kill()
        log.info("%s: lost: %s", name, why)
        if name == self.source:  # the controller's port: nothing can go on without it
            self.on_fault(name, f"the source device is lost ({why}): it carries every message of the run "
                          "and holds the embedding and LM head, so the run cannot go on")
        elif tell:
            self.on_lost(name, why)

    def port(self) -> RelayPort:
        return RelayPort(self)

    def pids(self) -> dict[str, int]:
        """The live agents' processes (attached agents have none here)."""
        return {n: p.pid for n, p in self.procs.items() if n not in self.failed}

    async def stop(self) -> None:
        self._stopping = True
        for name, c in list(self._control.items()):
            if name not in self.failed:
                try:
                    await c.request("stop", timeout=5)
                except (RuntimeError, ConnectionError, TimeoutError):
                    pass
            await c.close()
        for proc in self.procs.values():
            await _reap(proc)
        if self._session is not None:
            await self._session.close()
        if self.kernel is not None:
            self.kernel.down()
        self._dir.cleanup()

    # ------------------------------------------------------------------ events

    async def apply(self, e: Event, at: float | None = None) -> str:
        c = e.change
        gone = [d for d in (c.between if isinstance(c, SetLink) else (c.device,)) if d in self.failed]
        if gone and not isinstance(c, JoinDevice):
            return f"not applied: {', '.join(gone)} is gone"
        if isinstance(c, SetLink):
            a, b = c.between
            await self._control[b].request("event", action=c.ACTION, peer=a, fields=c.fields(), at=at)
            r = await self._control[a].request("event", action=c.ACTION, peer=b, fields=c.fields(), at=at)
            if self.kernel is not None:
                return f"{r['detail']}; {await self.kernel.set_link(c)}"
            return r["detail"]
        if isinstance(c, FailDevice):
            name = c.device
            self.failed.add(name)
            proc = self.procs.get(name)
            if proc is None:
                raise RuntimeError(f"{name} runs on another host: the runner cannot kill it")
            proc.kill()
            await proc.wait()
            if self.kernel is not None:
                return f"process {proc.pid} killed: its blocks and caches are gone; {await self.kernel.fail(name)}"
            return f"process {proc.pid} killed: its blocks and caches are gone"
        if isinstance(c, JoinDevice):
            self.names.append(c.device)
            await self._launch(c.device)
            await self._introduce()
            await self._control[c.device].request("announce")
            return f"compute_gflops={c.spec.compute_gflops:g} memory_mib={c.spec.memory_mib:g}"
        r = await self._control[c.device].request("event", action=c.ACTION, fields=wire_fields(c))
        return r["detail"]

    async def background(self, loads: dict[str, tuple[float, float]]) -> None:
        """The background load for this token: device -> (memory share, compute share)."""
        await self._each("background", {n: {"memory": m, "compute": c} for n, (m, c) in loads.items()})

    async def rescale(self, time_scale: float, epoch: float, at: float) -> None:
        """Every live agent switches to `time_scale` and `epoch` at Unix time `at`."""
        await self._each("clock", {n: {"time_scale": time_scale, "epoch": epoch, "at": at} for n in self.names})

    async def _each(self, op: str, fields: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """One request to each live agent named in `fields`; an agent that cannot answer is
        lost (and left out of the answers)."""
        names = [n for n in fields if n not in self.failed]
        replies = await asyncio.gather(*(self._control[n].request(op, timeout=STATE_TIMEOUT_S, **fields[n])
                                         for n in names), return_exceptions=True)
        out = {}
        for name, r in zip(names, replies, strict=True):
            if isinstance(r, (ConnectionError, TimeoutError, RuntimeError)):
                self._lose(name, f"no answer to {op!r} ({type(r).__name__}: {r})")
            elif isinstance(r, BaseException):
                raise r
            else:
                out[name] = r
        return out

    # ------------------------------------------------------------------ truth

    async def ask(self, name: str, op: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        """One control operation on one agent (harness/control.py's table), its answer."""
        return await self._control[name].request(op, timeout=timeout, **fields)

    async def _states(self) -> dict[str, dict[str, Any]]:
        """Every live agent's state; one that cannot answer is lost (and left out)."""
        return await self._each("state", {n: {} for n in self.names})

    async def lags(self) -> dict[str, dict[str, float]]:
        """Event-loop lag of every agent process so far (LagMonitor statistics)."""
        return {n: r["lag"] for n, r in (await self._states()).items()}

    async def frame_counts(self) -> dict[str, int]:
        states = (await self._states()).values()
        return {k: sum(r["frames"][k] for r in states) for k in ("lost", "refused")}

    async def device_rows(self) -> list[DeviceRow]:
        return [DeviceRow.from_wire(r["device"]) for r in (await self._states()).values()]

    async def link_rows(self) -> list[LinkRow]:
        rows = [LinkRow.from_wire(lk) for r in (await self._states()).values() for lk in r["links"]]
        return [lk for lk in rows if lk.dst not in self.failed]

    async def oracle(self, seq_len: int, interval: int, current: Placement | None) -> Snapshot:
        states = await self._states()
        devices, links = [], []
        for i, name in enumerate(self.names):
            r = states.get(name)
            if r is None:
                devices.append(DeviceState(name, 1.0, 0, False, alive=False))
                continue
            d = DeviceRow.from_wire(r["device"])
            devices.append(DeviceState.from_memory(name, d.compute_flops, d.memory.counters(), d.host_blocks,
                                                   bandwidth=d.memory_bandwidth or math.inf))
            links += [(i, self.names.index(lk.dst), lk.rate, lk.latency, lk.burst)
                      for lk in map(LinkRow.from_wire, r["links"])]
        return Snapshot.build(self.model, devices, link_matrices(len(self.names), links),
                              self.names.index(self.source), seq_len, interval, current)


async def _reap(proc: asyncio.subprocess.Process, grace: float = 3.0) -> None:
    if proc.returncode is not None:
        return
    try:
        await asyncio.wait_for(proc.wait(), from_wall(grace))
        return
    except TimeoutError:
        pass
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), from_wall(grace))
    except TimeoutError:
        proc.kill()
        await proc.wait()
