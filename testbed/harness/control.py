"""The control channel between a runner and an agent process: one record per operation,
checked against the run's scenario before the agent acts on it.

The runner (`remote.py`) sends `{"t": "op", "op": NAME, "rid": N, ...}` and gets
`{"t": "re", "rid": N, "ok": ..., ...}` back; `{"t": "send", "dst": D, "msg": M, "at": T}` carries a
controller request that leaves from the source agent as of emulated time T (optional: the
controller's instant, not when the relay reached the agent; its content is checked by the
device that receives it, as every message is: `agents/messages.py`), and `{"t": "send",
"sends": [{"dst": D, "msg": M, "at": T}, ...]}` several, which the agent hands to its
device in one go, in order (the requests the controller sent in one step). `decode` turns a
frame's map into its record or raises ControlError: unknown operations, missing fields,
devices and links that the scenario does not have, and numbers outside the scenario's
own ranges (a compute factor is finite and within FACTOR_RANGE, an amount of memory
within MAX_MEMORY_MIB, ...). The agent server answers a refused operation with `ok:
false`, counts and logs it, and goes on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..agents import messages as P
from ..scenario.format import (
    FACTOR_RANGE,
    MAX_BURST_KIB,
    MAX_DEVICES,
    MAX_LATENCY_MS,
    MAX_MEMORY_MIB,
    MAX_TIME_SCALE,
    MBPS_RANGE,
)

# the environment variable that carries the run's token to the agents it starts (and from
# the user to agents started by hand and to the runner that attaches them)
TOKEN_ENV = "TESTBED_RUN_TOKEN"
MAX_BULK_BYTES = 16 * 1024 * 1024  # one benchmark probe
MAX_BULK_COUNT = 10_000_000
MAX_BULK_S = 3600.0
MAX_URL = 256


class ControlError(ValueError):
    """An operation the agent will not carry out; the message says why."""


@dataclass(frozen=True)
class Context:
    """What the agent knows to check operations against: itself, the run's devices (and
    which it has links to), and the protocol bounds."""

    me: str
    devices: frozenset[str]
    bounds: P.Bounds


def _num(m: dict[str, Any], key: str, lo: float, hi: float, optional: bool = False) -> float | None:
    v = m.get(key)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
        raise ControlError(f"{key} must be a finite number from {lo:g} to {hi:g}, got {P.show(v)}")
    return float(v)


def _int(m: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = m.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ControlError(f"{key} must be an integer from {lo} to {hi}, got {P.show(v)}")
    return v


def _peer(m: dict[str, Any], key: str, c: Context) -> str:
    v = m.get(key)
    if v not in c.devices or v == c.me:
        raise ControlError(f"{key} must be another device of this run, got {P.show(v)}")
    return v


@dataclass(frozen=True)
class Send:
    """A controller request leaving from this (source) agent."""

    dst: str
    msg: dict[str, Any]
    at: float | None = None  # the emulated time it is handed over (default: when it arrives)


# controller requests in one "send" frame (a step of the controller sends at most a few per
# block or device; the frame's size bounds them too)
MAX_SENDS = 65536


@dataclass(frozen=True)
class Op:
    """An operation: its name, request id and checked fields."""

    op: str
    rid: int
    fields: dict[str, Any]


def _clock(m: dict[str, Any], c: Context) -> dict[str, Any]:
    """The run's time scale and epoch, from now or (`at`, a Unix time) from that instant."""
    k = _num(m, "time_scale", 0.0, MAX_TIME_SCALE)
    if not k:
        raise ControlError("time_scale must be above 0")
    return {"time_scale": k, "epoch": _num(m, "epoch", -1e11, 1e11), "at": _num(m, "at", 0.0, 1e11, optional=True)}


def _peers(m: dict[str, Any], c: Context) -> dict[str, Any]:
    peers = m.get("peers")
    if not isinstance(peers, dict) or not 0 < len(peers) <= MAX_DEVICES:
        raise ControlError("peers must map devices to addresses")
    for name, url in peers.items():
        if name not in c.devices:
            raise ControlError(f"peers: {P.show(name)} is not a device of this run")
        if not isinstance(url, str) or len(url) > MAX_URL or not url.startswith(("http://", "https://")):
            raise ControlError(f"peers.{name}: not an http(s) address: {P.show(url)}")
    dial = m.get("dial", True)
    if not isinstance(dial, bool):
        raise ControlError("peers: dial must be true or false")
    return {"peers": dict(peers), "dial": dial}


_EVENT_FIELDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "set_compute": lambda f: {"factor": _num(f, "factor", *FACTOR_RANGE)},
    "memory_pressure": lambda f: {"take_mib": _num(f, "take_mib", 1e-9, MAX_MEMORY_MIB)},
    "memory_release": lambda f: {"mib": _num(f, "mib", 1e-9, MAX_MEMORY_MIB, optional=True)},
    "set_link": lambda f: {
        "bandwidth_mbps": (0.0 if f.get("bandwidth_mbps") == 0 and not isinstance(f.get("bandwidth_mbps"), bool)
                           else _num(f, "bandwidth_mbps", *MBPS_RANGE, optional=True)),
        "latency_ms": _num(f, "latency_ms", 0.0, MAX_LATENCY_MS, optional=True),
        "burst_kib": _num(f, "burst_kib", 0.0, MAX_BURST_KIB, optional=True)},
}


def _event(m: dict[str, Any], c: Context) -> dict[str, Any]:
    action, fields = m.get("action"), m.get("fields")
    if action not in _EVENT_FIELDS or not isinstance(fields, dict):
        raise ControlError(f"event: unknown action {P.show(action)} or no fields")
    out: dict[str, Any] = {"action": action, "fields": _EVENT_FIELDS[action](fields)}
    if action == "set_link":
        out["peer"] = _peer(m, "peer", c)
    return out


def _bulk(m: dict[str, Any], c: Context) -> dict[str, Any]:
    return {"peer": _peer(m, "peer", c), "size": _int(m, "size", 0, MAX_BULK_BYTES),
            "count": _int(m, "count", 1, MAX_BULK_COUNT), "seconds": _num(m, "seconds", 1e-6, MAX_BULK_S)}


def _background(m: dict[str, Any], c: Context) -> dict[str, Any]:
    """This token's background load: shares of the device, from 0 up to, not including, 1
    (as background_load's values in the scenario)."""
    out = {k: _num(m, k, 0.0, 1.0) for k in ("memory", "compute")}
    if any(v >= 1.0 for v in out.values()):  # type: ignore[operator]  # each value was just checked to be a number
        raise ControlError("background: a share must be below 1 (a device keeps some)")
    return out


def _probe_log(m: dict[str, Any], c: Context) -> dict[str, Any]:
    if not isinstance(m.get("on"), bool):
        raise ControlError("probe_log: on must be true or false")
    return {"on": m["on"]}


# the control channel's table: operation -> its fields' check
OPS: dict[str, Callable[[dict[str, Any], Context], dict[str, Any]]] = {
    "clock": _clock, "peers": _peers, "event": _event, "background": _background, "bulk": _bulk,
    "probe_log": _probe_log,
    "state": lambda m, c: {}, "attach": lambda m, c: {}, "announce": lambda m, c: {}, "stop": lambda m, c: {},
}


def _send(m: Any, c: Context) -> Send:
    if not isinstance(m, dict):
        raise ControlError(f"send: a request must be a map, got {P.show(m)}")
    dst, msg = m.get("dst"), m.get("msg")
    if dst not in c.devices:
        raise ControlError(f"send: {P.show(dst)} is not a device of this run")
    if not isinstance(msg, dict) or msg.get("t") not in P.FROM_CONTROLLER:
        raise ControlError(f"send: only controller requests leave this way, not {P.show(P.kind_of(msg))}")
    return Send(dst, msg, _num(m, "at", 0.0, 1e11, optional=True))


def decode(m: dict[str, Any], c: Context) -> tuple[Send, ...] | Op:
    """A control frame's map as its record (a "send" frame: its requests, in order);
    ControlError when it may not be carried out (a "send" frame with one bad request: none
    of them)."""
    t = m.get("t")
    if t == "send":
        if "sends" not in m:
            return (_send(m, c),)
        sends = m["sends"]
        if not isinstance(sends, list) or not 0 < len(sends) <= MAX_SENDS:
            raise ControlError(f"send: sends must be a list of 1 to {MAX_SENDS} requests")
        return tuple(_send(x, c) for x in sends)
    if t != "op":
        raise ControlError(f"unknown control frame {P.show(t)}")
    rid, op = _int(m, "rid", 0, P.MAX_ID), m.get("op")
    check = OPS.get(op)  # type: ignore[arg-type]  # any op is looked up; an unknown one is refused below
    if check is None:
        raise ControlError(f"unknown control operation {P.show(op)}")
    return Op(op, rid, check(m, c))  # type: ignore[arg-type]  # rid and op were checked above
