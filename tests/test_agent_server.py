"""A live agent (testbed/harness/agent_server.py) under hostile input from a token holder,
over loopback: every message on every channel is checked, a refused one is counted and
logged (rate-limited) and changes nothing, what a peer can make the agent hold is bounded,
and the agent answers a legitimate request afterwards.
Hypothesis sends random frames too. Every wait is bounded."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.agents import messages as P
from testbed.emulation.clock import run as run_loop
from testbed.harness.agent_server import AgentProcess
from testbed.harness.remote import ProcessCluster, _Control
from testbed.scenario import load
from testbed.transport import ws as ws_mod
from testbed.transport.codec import encode

ROOT = Path(__file__).resolve().parents[1]
SCEN = load(ROOT / "scenarios" / "steady.yaml")
S = SCEN.model
TOKEN = "h" * 32
SOURCE = SCEN.source  # gateway


class Live:
    """An agent process's server in this process, its peers known, and clients for it."""

    def __init__(self, proc: AgentProcess) -> None:
        self.proc, self.agent, self.ep = proc, proc.agent, proc.ep
        self.sessions: list[aiohttp.ClientSession] = []
        self.peers: dict[str, aiohttp.ClientWebSocketResponse] = {}

    async def peer(self, name: str) -> aiohttp.ClientWebSocketResponse:
        ws = await self._ws("/peer", {"X-Agent": name})
        self.peers[name] = ws
        return ws

    async def control(self) -> aiohttp.ClientWebSocketResponse:
        return await self._ws("/control", {})

    async def _ws(self, path: str, headers: dict[str, str]) -> aiohttp.ClientWebSocketResponse:
        s = aiohttp.ClientSession()
        self.sessions.append(s)
        return await s.ws_connect(f"{self.ep.url}{path}", max_msg_size=1 << 26,
                                  headers={"Authorization": f"Bearer {TOKEN}", **headers})

    async def op(self, ws: aiohttp.ClientWebSocketResponse, **m: Any) -> dict[str, Any]:
        """A control request and its answer."""
        await ws.send_bytes(encode(m))
        while True:
            msg = await asyncio.wait_for(ws.receive(), 10)
            reply = msgpack.unpackb(msg.data)
            if reply.get("t") == "re":
                return reply

    async def legit(self) -> None:
        """The controller asks for telemetry and gets its answer: the agent serves. (To a
        device it comes from the source over /peer; the source's own agent gets it from
        the runner over /control and answers there.)"""
        if self.agent.name != SOURCE:
            ws = self.peers.get(SOURCE)
            if ws is None or ws.closed:
                ws = await self.peer(SOURCE)
            await ws.send_bytes(encode({"t": P.TELEMETRY, "rid": 77, "probe_bytes": 0}))
            reply: dict[str, Any] = {}
            while reply.get("rid") != 77:  # earlier answers to this connection come first
                reply = msgpack.unpackb((await asyncio.wait_for(ws.receive(), 10)).data)
        else:
            ws = await self.control()
            assert (await self.op(ws, t="op", op="attach", rid=1))["ok"]
            await ws.send_bytes(encode({"t": "send", "dst": SOURCE, "msg": {"t": P.TELEMETRY, "rid": 77,
                                                                           "probe_bytes": 0}}))
            relay = msgpack.unpackb((await asyncio.wait_for(ws.receive(), 10)).data)
            assert relay["t"] == "ctl" and relay["sender"] == SOURCE, relay
            reply = relay["msg"]
        assert reply["t"] == P.ACK and reply["rid"] == 77 and reply["ok"], reply
        await ws.close()

    async def close(self) -> None:
        for s in self.sessions:
            await s.close()
        await self.agent.stop()
        await self.ep.close()


def live(device: str, body: Callable[[Live], Awaitable[None]]) -> None:
    async def main() -> None:
        proc = AgentProcess(SCEN, device, TOKEN, "127.0.0.1", 0, False)
        await proc.ep.start()
        for d in SCEN.devices:  # the others are known (as after `peers`), never dialled
            if d.name != device:
                proc.ep.add_peer(d.name, "http://127.0.0.1:9", SCEN.network.link(device, d.name))
        lv = Live(proc)
        try:
            await body(lv)
        finally:
            await lv.close()

    run_loop(main, "real")


async def _settle() -> None:
    await asyncio.sleep(0.2)


def _routed_here(layer: int) -> list[int]:
    """A routing table with proj and ffn of `layer` (and its heads) on pi-a."""
    devices = [SOURCE, "pi-a"]
    return [1 if b.layer == layer else 0 for b in S.blocks], devices  # type: ignore[return-value]


# ------------------------------------------------------------------------ what reaches the controller


def test_reports_for_the_controller_over_peer_are_checked_before_relaying() -> None:
    """An `ack` without `rid` (or a report about another device) sent over /peer to the
    source is refused and counted there, nothing reaches the runner's controller, and the
    agent serves on. (In a run every device's name is connected, so tests/test_remote.py
    cannot send these over /peer; here the name is free.)"""

    async def body(lv: Live) -> None:
        ctl = await lv.control()
        assert (await lv.op(ctl, t="op", op="attach", rid=1))["ok"]
        peer = await lv.peer("pi-a")
        for m in ({"t": P.ACK}, {"t": P.ACK, "ok": True, "device": "pi-a"},
                  {"t": P.ERROR, "kind": "agent", "device": "pi-b"}):
            await peer.send_bytes(encode(m))
        await _settle()
        relayed = []
        try:
            while True:
                relayed.append(msgpack.unpackb((await asyncio.wait_for(ctl.receive(), 0.5)).data))
        except TimeoutError:
            pass
        assert relayed == [], relayed
        assert lv.agent.refusals.total == 3
        await lv.legit()

    live(SOURCE, body)


def test_the_controllers_messages_of_one_step_leave_the_source_agent_in_their_order() -> None:
    """The controller sends in one step a request to pi-a, a migration of a head from the
    source itself to pi-a, and another request to pi-a. Through the port of agents in other
    processes (`ProcessCluster`'s relay) they take pi-a's link in the order a source in the
    controller's process puts them there: both requests, then the snapshot, which the
    source sends when it handles its own request, after them. Ahead of the second request,
    the snapshot's transfer would delay it (a migration's stall longer than its virtual
    twin's). A relayed "send" frame with one bad request sends none of them."""

    async def body(lv: Live) -> None:
        acks: dict[int, dict[str, Any]] = {}
        world = ProcessCluster(SCEN, S, lambda who, why: None)
        try:
            ctl = _Control(SOURCE, await lv.control(), lambda sender, msg, at: acks.setdefault(msg["rid"], msg),
                           lambda name: None)
            world._control[SOURCE] = ctl
            await ctl.request("attach", timeout=10)
            port = world.port()
            port.send(SOURCE, P.Load(1, ("head.0.0",)).wire())
            for _ in range(100):
                if 1 in acks:
                    break
                await asyncio.sleep(0.05)
            assert acks.get(1, {}).get("ok"), acks
            link, sizes = lv.ep.links["pi-a"], []
            send = link.send
            link.send = lambda frame, *a: (sizes.append(len(frame)), send(frame, *a))  # type: ignore[method-assign]

            port.send("pi-a", P.Telemetry(2, 0).wire())
            port.send(SOURCE, P.Migrate(3, "head.0.0", "pi-a").wire())
            port.send("pi-a", P.Telemetry(4, 0).wire())
            for _ in range(100):
                if len(sizes) == 3:
                    break
                await asyncio.sleep(0.05)
            assert len(sizes) == 3 and sizes[2] > 10 * max(sizes[:2]), sizes

            refused = lv.ep.refusals.total
            await ctl.ws.send_bytes(encode({"t": "send", "sends": [
                {"dst": "pi-a", "msg": P.Telemetry(5, 0).wire()}, {"dst": "pi-a", "msg": {"t": P.ACK}}]}))
            await ctl.request("probe_log", timeout=10, on=False)  # answered after the frame before it
            assert lv.ep.refusals.total == refused + 1 and len(sizes) == 3, sizes
        finally:
            for c in world._control.values():
                await c.close()
            world._dir.cleanup()

    live(SOURCE, body)


# ------------------------------------------------------------------------ what the agent holds


def test_set_compute_with_a_factor_out_of_range_is_refused() -> None:
    async def body(lv: Live) -> None:
        ws = await lv.control()
        for factor in (-1, 0, math.nan, math.inf, 1e9):
            r = await lv.op(ws, t="op", op="event", rid=1, action="set_compute",
                            fields={"factor": factor, "take_mib": None, "mib": None})
            assert not r["ok"] and "factor" in r["detail"], r
        assert lv.agent.compute.factor == 1.0
        r = await lv.op(ws, t="op", op="event", rid=2, action="set_compute", fields={"factor": 0.5})
        assert r["ok"] and lv.agent.compute.factor == 0.5
        state = await lv.op(ws, t="op", op="state", rid=3)
        assert state["frames"]["refused"] >= 5  # control refusals are counted
        await lv.legit()

    live("pi-a", body)


def test_messages_the_agent_addresses_to_itself_are_checked() -> None:
    """A control `send` to the source itself is checked like any message: an abort with seq
    1e308 (it would silence the agent), a negative reservation or a token outside the
    vocabulary is refused and counted; a controller-bound kind cannot be sent."""

    async def body(lv: Live) -> None:
        ws = await lv.control()
        for msg in ({"t": P.ABORT, "rid": 1, "seq": 1e308}, {"t": P.ABORT, "rid": 1, "seq": 2**64 - 1},
                    {"t": P.RESERVE, "rid": 2, "blocks": {"ffn.0": -4096}},
                    {"t": P.GEN, "seq": 1, "tokens": [S.vocab + 5], "pos": 0}):
            await ws.send_bytes(encode({"t": "send", "dst": SOURCE, "msg": msg}))
        r = await lv.op(ws, t="send", dst=SOURCE, msg={"t": P.ACK, "device": SOURCE})
        assert not r["ok"] and "controller requests" in r["detail"]
        await _settle()
        assert lv.agent.floor == -1 and lv.agent.reserved == {} and lv.agent.budget.by_category["reserved"] == 0
        assert lv.agent.refusals.total == 4
        await lv.legit()

    live(SOURCE, body)


def test_an_abort_beyond_the_run_on_peer_is_refused_and_later_tokens_flow() -> None:
    async def body(lv: Live) -> None:
        src = await lv.peer(SOURCE)
        await src.send_bytes(encode({"t": P.ABORT, "rid": 1, "seq": 2**64 - 1}))
        assign, devices = _routed_here(0)
        await src.send_bytes(encode({"t": P.LOAD, "rid": 2, "blocks": [b.name for b in S.blocks if b.layer == 0]}))
        await src.send_bytes(encode({"t": P.ROUTE, "rid": 3, "version": 1, "devices": devices, "assign": assign}))
        await _settle()
        assert lv.agent.floor == -1
        jobs = lv.agent.compute.jobs
        await src.send_bytes(encode({"t": P.LAYER_INPUT, "seq": 5, "layer": 0, "pos": 0, "x": torch.zeros(2, S.d_model)}))
        for _ in range(50):  # the valid attempt runs (heads, proj, ffn of layer 0)
            await asyncio.sleep(0.05)
            if lv.agent.compute.jobs >= jobs + 3:
                break
        assert lv.agent.compute.jobs >= jobs + 3
        await lv.legit()

    live("pi-a", body)


def test_an_output_longer_than_the_run_is_refused() -> None:
    """An `LAST_HIDDEN` of 100,000 rows (100 MiB) on a 2,048-token model is refused: the frame is
    over what this run can need, and fewer rows are over the run's length."""

    async def body(lv: Live) -> None:
        rows = lv.ep.max_frame // (4 * S.d_model) - 16  # the most that fits in a frame
        for n, name in ((100_000, "pi-a"), (rows, "pi-b")):
            peer = await lv.peer(name)
            try:
                await peer.send_bytes(encode({"t": P.LAST_HIDDEN, "seq": 1, "x": torch.zeros(n, S.d_model)}))
            except ConnectionError:  # the agent closes a connection that sends an oversized frame
                pass
            await _settle()
        assert not lv.agent._tasks and lv.agent.compute.jobs == 0  # nothing was queued for it
        assert lv.ep.refused + lv.agent.refusals.total == 2
        await lv.legit()

    live(SOURCE, body)


def test_distinct_sequence_numbers_cannot_grow_the_agent() -> None:
    """1,200 `h` frames with distinct seq (300 MiB if all were kept): a peer contributes to
    at most `quota` pending inputs and the rest is refused."""

    async def body(lv: Live) -> None:
        src, peer = await lv.peer(SOURCE), await lv.peer("pi-b")
        assign, devices = _routed_here(1)
        await src.send_bytes(encode({"t": P.LOAD, "rid": 1, "blocks": [b.name for b in S.blocks if b.layer == 1]}))
        await src.send_bytes(encode({"t": P.ROUTE, "rid": 2, "version": 1, "devices": devices, "assign": assign}))
        await _settle()
        out = torch.zeros(4, S.q_per_group * S.d_head)
        for seq in range(1, 1201):
            await peer.send_bytes(encode({"t": P.HEAD_OUTPUTS, "seq": seq, "layer": 1, "pos": 0, "groups": [0], "out": out}))
        quota = 2 * S.layers + 4  # twice what a pipeline has in flight
        await asyncio.sleep(2.0)
        assert len(lv.agent.join) <= quota
        assert lv.agent.quota == quota and lv.agent.refusals.total >= 1200 - quota
        await lv.legit()

    live("pi-a", body)


# ------------------------------------------------------------------------ authentication


def test_a_non_utf8_authorization_header_is_401() -> None:
    async def body(lv: Live) -> None:
        for path in (b"/peer", b"/control"):
            r, w = await asyncio.open_connection("127.0.0.1", lv.ep.port)
            w.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nX-Agent: pi-b\r\nAuthorization: Bearer \xff\xfe\x80\r\n"
                    b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            await w.drain()
            status = await asyncio.wait_for(r.readline(), 10)
            w.close()
            assert status.split()[1] == b"401", status
        await lv.legit()

    live("pi-a", body)


def test_a_flood_of_bad_frames_writes_few_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    async def body(lv: Live) -> None:
        peer = await lv.peer("pi-b")
        for i in range(20_000):
            await peer.send_bytes(b"\xc1" if i % 2 else encode({"t": P.LAYER_INPUT, "seq": -1}))
        for _ in range(200):  # the undecodable half is the endpoint's to refuse
            await asyncio.sleep(0.05)
            if lv.ep.refused >= 10_000:
                break
        await _settle()
        assert lv.ep.refused + lv.agent.refusals.total == 20_000
        await lv.legit()

    with caplog.at_level(logging.WARNING):
        try:
            live("pi-a", body)
        finally:  # (checked first: the reason for this test)
            lines = [r for r in caplog.records if "refused" in r.getMessage()]
            assert 2 <= len(lines) <= 60, len(lines)  # one per peer, kind and second (two kinds here)


def test_a_connection_that_never_sends_its_request_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ws_mod, "HANDSHAKE_S", 1.0, raising=False)

    async def body(lv: Live) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", lv.ep.port)
        w.write(b"GET /peer HTTP/1.1\r\nHost: x\r\n")  # then nothing
        await w.drain()
        data = await asyncio.wait_for(r.read(), 8)  # returns once the server closes
        assert data == b"" or data.startswith(b"HTTP/1.1 4"), data
        w.close()
        await lv.legit()

    live("pi-a", body)


# ------------------------------------------------------------------------ fuzzing

KINDS = sorted(P.DATA | P.TO_CONTROLLER | {P.LOAD, P.ROUTE, P.RESERVE, P.CANCEL, P.MIGRATE, P.BLOCK, P.ABORT,
                                            P.TELEMETRY, P.PROBE})
FRAMES = st.lists(st.one_of(
    st.binary(max_size=256),
    st.builds(lambda v: msgpack.packb(v, use_bin_type=True), st.dictionaries(
        st.sampled_from(["t", "seq", "rid", "layer", "pos", "x", "blocks", "op", "dst", "msg", "device", "sends"]),
        st.one_of(st.sampled_from(KINDS), st.integers(-(2**63), 2**64 - 1), st.floats(),
                  st.text(max_size=10), st.lists(st.integers(-3, 300), max_size=4)), max_size=6)),
    st.builds(lambda k, cut: encode({"t": k, "seq": 1, "rid": 1, "layer": 0, "pos": 0,
                                     "x": torch.zeros(1, S.d_model)})[:cut],
              st.sampled_from(KINDS), st.integers(0, 80)),
), min_size=1, max_size=12)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(peer_frames=FRAMES, control_frames=FRAMES)
def test_fuzz_a_live_agent_keeps_serving(peer_frames: list[bytes], control_frames: list[bytes]) -> None:
    """Random, malformed and truncated frames on /peer and /control: refused, counted, and
    the agent still answers the source."""

    async def body(lv: Live) -> None:
        peer, ctl = await lv.peer("pi-b"), await lv.control()
        for f in peer_frames:
            await peer.send_bytes(f)
        for f in control_frames:
            await ctl.send_bytes(f)
        await _settle()
        assert lv.agent.blocks == {} and lv.agent.floor == -1 and lv.agent.compute.factor == 1.0
        await lv.legit()

    live("pi-a", body)


def test_a_second_connection_in_a_connected_peers_name_is_refused() -> None:
    """A token holder claiming the name of a connected device gets HTTP 409 and the device
    stays connected (its connection is not replaced, so not cut off)."""

    async def body(lv: Live) -> None:
        first = await lv.peer("pi-b")
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await lv.peer("pi-b")
        assert info.value.status == 409
        await first.send_bytes(encode({"t": P.PROBE, "pad": b"x"}))
        await _settle()
        assert not first.closed and lv.ep.refused == 1
        await lv.legit()

    live("pi-a", body)


# ------------------------------------------------------------------------ introductions


def test_agents_learn_every_peer_before_any_dials(monkeypatch: pytest.MonkeyPatch) -> None:
    """A runner introduces its agents in two rounds: every agent knows the whole book
    before any of them dials, so no agent refuses a peer it has not heard of yet (which a
    normal run then counted as a hostile frame, and logged). Made certain here: one agent
    (last in name order, so it is dialled and never dials) takes its peers slowly."""
    from testbed.harness import agent_server
    from testbed.harness.remote import ProcessCluster

    slow = max(d.name for d in SCEN.devices)
    peers_op = agent_server._OPS["peers"]

    async def slow_peers(proc: AgentProcess, m: dict[str, Any], out: asyncio.Queue[bytes]) -> Any:
        if proc.spec.name == slow:
            await asyncio.sleep(0.5)
        return await peers_op(proc, m, out)

    monkeypatch.setitem(agent_server._OPS, "peers", slow_peers)

    async def main() -> None:
        procs = {d.name: AgentProcess(SCEN, d.name, TOKEN, "127.0.0.1", 0, False) for d in SCEN.devices}
        for p in procs.values():
            await p.ep.start()
        faults: list[tuple[str, str]] = []
        cluster = ProcessCluster(SCEN, S, lambda *f: faults.append(f),
                                 attach={n: p.ep.url for n, p in procs.items()}, token=TOKEN)
        try:
            await asyncio.wait_for(cluster.start(), 30)
            for name, p in procs.items():
                others = {d.name for d in SCEN.devices} - {name}
                assert set(p.ep._ws) == others, (name, sorted(p.ep._ws))
            assert {n: p.ep.refused for n, p in procs.items()} == dict.fromkeys(procs, 0)
            assert faults == []
        finally:
            await cluster.stop()
            for p in procs.values():
                await p.agent.stop()
                await p.ep.close()

    run_loop(main, "real")


def test_the_peers_operation_dials_unless_told_not_to() -> None:
    from testbed.harness import control

    ctx = control.Context(SOURCE, frozenset(d.name for d in SCEN.devices), P.Bounds.for_run(SCEN))
    book = {"pi-a": "http://127.0.0.1:9"}
    op = control.decode({"t": "op", "op": "peers", "rid": 1, "peers": book}, ctx)
    assert isinstance(op, control.Op) and op.fields == {"peers": book, "dial": True}
    op = control.decode({"t": "op", "op": "peers", "rid": 1, "peers": book, "dial": False}, ctx)
    assert isinstance(op, control.Op) and op.fields["dial"] is False
    with pytest.raises(control.ControlError, match="dial must be true or false"):
        control.decode({"t": "op", "op": "peers", "rid": 1, "peers": book, "dial": 1}, ctx)
