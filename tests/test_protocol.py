"""The protocol's one check (testbed/agents/messages.py): every message a real run sends
is accepted as the record of its kind; hostile values in valid shapes, random msgpack and
truncated frames are refused with ProtocolError or FrameError and nothing else, and what
is accepted lies within the run's bounds. Hypothesis generates the hostile input; the
examples are capped so the file runs in seconds."""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.agents import messages as P
from testbed.scenario import load
from testbed.transport.codec import FrameError, decode, encode

ROOT = Path(__file__).resolve().parents[1]
SCEN = load(ROOT / "scenarios" / "steady.yaml")
B = P.Bounds.for_run(SCEN)
S = SCEN.model
SRC, PEER, ME = "gateway", "pi-a", "pi-b"
# the same run with its FFN in 4 shards: the bounds that accept partial FFN sums (`f`)
BS = replace(B, model=replace(S, ffn_shards=4))
# examples per fuzz test: a few hundred keep CI fast; TESTBED_FUZZ_EXAMPLES=5000 searches longer
EXAMPLES = int(os.environ.get("TESTBED_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid() -> dict[str, dict[str, Any]]:
    """One well-formed message of every kind, as a run sends them."""
    D, q, d = S.d_model, S.q_per_group, S.d_head
    x = torch.zeros(3, D)
    mem = dict.fromkeys(P.COUNTERS, 0)
    return {
        P.GEN: {"t": P.GEN, "seq": 4, "tokens": [1, 2, 3], "pos": 0},
        P.LAYER_INPUT: {"t": P.LAYER_INPUT, "seq": 4, "layer": 1, "pos": 16, "x": x},
        P.FFN_INPUT: {"t": P.FFN_INPUT, "seq": 4, "layer": 1, "pos": 16, "x": x},
        P.HEAD_OUTPUTS: {"t": P.HEAD_OUTPUTS, "seq": 4, "layer": 1, "pos": 16, "groups": [0, 2], "out": torch.zeros(3, 2 * q * d)},
        P.LAST_HIDDEN: {"t": P.LAST_HIDDEN, "seq": 4, "x": x},
        P.FFN_PARTIAL: {"t": P.FFN_PARTIAL, "seq": 4, "layer": 1, "pos": 16, "shards": [1, 3], "x": x},
        P.LOGITS: {"t": P.LOGITS, "seq": 4, "logits": torch.zeros(S.vocab), "at": 1.5},
        P.LOAD: {"t": P.LOAD, "rid": 1, "blocks": ["head.0.0", "proj.3", "ffn.2"]},
        P.CANCEL: {"t": P.CANCEL, "rid": 1, "blocks": ["ffn.2"]},
        P.ROUTE: {"t": P.ROUTE, "rid": 2, "version": 1, "devices": [SRC, PEER, ME],
                  "assign": [i % 3 for i in range(len(S.blocks))]},
        P.RESERVE: {"t": P.RESERVE, "rid": 3, "blocks": {"ffn.1": 1000}},
        P.MIGRATE: {"t": P.MIGRATE, "rid": 4, "block": "proj.0", "to": ME},
        P.BLOCK: {"t": P.BLOCK, "rid": 4, "block": "proj.0", "w": {"wo": torch.zeros(D, D), "bo": torch.zeros(D)}},
        P.ABORT: {"t": P.ABORT, "rid": 5, "seq": 4},
        P.TELEMETRY: {"t": P.TELEMETRY, "rid": 6, "probe_bytes": 2048},
        P.PROBE: {"t": P.PROBE, "pad": b"\0" * 10, "n": 3},
        P.ACK: {"t": P.ACK, "rid": 6, "ok": True, "device": PEER, "at": 1.0, "memory": mem, "kv": 0,
                "weights": 0, "flops": 1e9, "links": {ME: {"rate": 1e6, "latency": None, "bytes": 5}}},
        P.ERROR: {"t": P.ERROR, "kind": "oom", "device": PEER, "seq": 4, "layer": 0, "bytes": 64,
                  "detail": "no room", "memory": mem, "at": 2.0},
        P.PRESSURE: {"t": P.PRESSURE, "device": PEER, "memory": mem, "at": 2.0},
        P.LINK_CHANGE: {"t": P.LINK_CHANGE, "device": PEER, "peer": ME, "rate": 0.0, "latency": 1e-4, "at": 2.0},
        P.DOWN: {"t": P.DOWN, "device": ME},
        P.JOIN: {"t": P.JOIN, "device": PEER, "memory": mem, "flops": 1e9, "host_blocks": True, "at": 0.0},
    }


def _accept(raw: dict[str, Any]) -> P.Message:
    """Where each kind is legitimately received, as which sender."""
    t = raw["t"]
    if t in (P.LOGITS, P.DOWN):
        return P.for_controller(raw, SRC, B)
    if t in P.TO_CONTROLLER:
        return P.for_controller(raw, raw["device"], B)
    if t == P.FFN_PARTIAL:
        return P.for_device(raw, PEER, ME, BS)
    if t in P.FROM_CONTROLLER:
        return P.for_device(raw, SRC, SRC if t == P.GEN else ME, B)
    return P.for_device(raw, PEER, SRC if t == P.LAST_HIDDEN else ME, B)


def test_the_table_covers_every_kind_once() -> None:
    assert set(P.TABLE) == set(_valid()) == P.DATA | P.TO_CONTROLLER | P.FROM_CONTROLLER | {P.BLOCK, P.PROBE}
    for kind, cls in P.TABLE.items():
        assert cls.KIND == kind


@pytest.mark.parametrize("kind", sorted(_valid()))
def test_every_valid_message_is_its_record_and_back(kind: str) -> None:
    raw = _valid()[kind]
    m = _accept(raw)
    assert type(m) is P.TABLE[kind] and m.t == kind
    wire = decode(encode(m.wire()))  # a record goes back on the wire as the map it came from
    again = _accept(wire)
    assert type(again) is type(m)


@pytest.mark.parametrize("kind", sorted(_valid()))
def test_a_record_sent_is_as_many_bytes_as_the_map_it_came_from(kind: str) -> None:
    # links charge a frame's length: a sender building the record instead of the map must not
    # change it (a required field that is None, as a link change's unknown latency, is sent)
    raw = dict(_valid()[kind])
    if kind == P.LINK_CHANGE:
        raw["latency"] = None
    assert len(encode(_accept(raw).wire())) == len(encode(raw))


@pytest.mark.parametrize(("raw", "sender", "me", "why"), [
    # an abort far beyond the run's attempts (it would silence the agent for good)
    ({"t": P.ABORT, "rid": 1, "seq": 2**64 - 1}, SRC, ME, "seq"),
    ({"t": P.ABORT, "rid": 1, "seq": 1e308}, SRC, SRC, "seq"),
    # a negative reservation, a token outside the vocabulary
    ({"t": P.RESERVE, "rid": 1, "blocks": {"ffn.0": -1}}, SRC, SRC, "blocks.ffn.0"),
    ({"t": P.GEN, "seq": 1, "tokens": [S.vocab], "pos": 0}, SRC, SRC, "tokens"),
    # an output of 100,000 rows on a 2,048-token model
    ({"t": P.LAST_HIDDEN, "seq": 1, "x": torch.zeros(100_000, S.d_model)}, PEER, SRC, "rows"),
    # rows past the run's length, a layer the model does not have, a dtype it does not use
    ({"t": P.LAYER_INPUT, "seq": 1, "layer": 0, "pos": B.max_rows - 1, "x": torch.zeros(2, S.d_model)}, PEER, ME, "rows"),
    ({"t": P.LAYER_INPUT, "seq": 1, "layer": S.layers, "pos": 0, "x": torch.zeros(1, S.d_model)}, PEER, ME, "layer"),
    ({"t": P.LAYER_INPUT, "seq": 1, "layer": 0, "pos": 0, "x": torch.zeros(1, S.d_model, dtype=torch.float16)},
     PEER, ME, "dtype"),
    # who may send what: controller requests only from the source; reports about their sender
    ({"t": P.ABORT, "rid": 1, "seq": 1}, PEER, ME, "controller"),
    ({"t": P.LOAD, "rid": 1, "blocks": ["ffn.0"]}, "mallory", ME, "unknown sender"),
    ({"t": P.PRESSURE, "device": ME, "memory": dict.fromkeys(P.COUNTERS, 0), "at": 0.0}, PEER, SRC, "sent by"),
    ({"t": P.DOWN, "device": ME}, PEER, SRC, "own report"),
    ({"t": P.GEN, "seq": 1, "tokens": [1], "pos": 0}, SRC, ME, "source device"),
    # an answer without a request id
    ({"t": P.ACK, "ok": True, "device": PEER}, PEER, SRC, "rid"),
])
def test_hostile_messages_are_refused(raw: dict[str, Any], sender: str, me: str, why: str) -> None:
    with pytest.raises(P.ProtocolError, match=why):
        P.for_device(raw, sender, me, B)


@pytest.mark.parametrize(("bounds", "shards", "why"), [
    (B, [1], "shards"),  # an unsharded model has no partial sums
    (BS, [0, 1], "shards"),  # shard 0's own sum never travels: it is summed where it is computed
    (BS, [4], "shards"),  # no such shard
    (BS, [1, 1], "shards"),  # one shard twice
])
def test_partial_ffn_sums_name_real_shards(bounds: P.Bounds, shards: list[int], why: str) -> None:
    raw = {"t": P.FFN_PARTIAL, "seq": 1, "layer": 0, "pos": 0, "shards": shards, "x": torch.zeros(1, S.d_model)}
    with pytest.raises(P.ProtocolError, match=why):
        P.for_device(raw, PEER, ME, bounds)
    assert isinstance(P.for_device({**raw, "shards": [2]}, PEER, ME, BS), P.FfnPartial)


def test_block_names_follow_the_models_ffn_sharding() -> None:
    load_ = {"t": P.LOAD, "rid": 1, "blocks": ["ffn.2.3"]}
    assert P.for_device(load_, SRC, ME, BS).blocks == ("ffn.2.3",)  # type: ignore[attr-defined]
    for raw, bounds in ((load_, B), ({**load_, "blocks": ["ffn.2"]}, BS), ({**load_, "blocks": ["ffn.2.4"]}, BS)):
        with pytest.raises(P.ProtocolError, match="not a block"):
            P.for_device(raw, SRC, ME, bounds)


def test_an_answer_must_carry_what_its_request_needs() -> None:
    bare = P.for_controller({"t": P.ACK, "rid": 9, "ok": True, "device": PEER}, PEER, B)
    assert isinstance(bare, P.Ack)
    bare.answers(P.ABORT)
    for request in (P.TELEMETRY, P.LOAD, P.RESERVE, P.ROUTE):
        with pytest.raises(P.ProtocolError, match="missing"):
            bare.answers(request)
    failed = P.for_controller({"t": P.ACK, "rid": 9, "ok": False, "device": PEER, "detail": "no"}, PEER, B)
    failed.answers(P.TELEMETRY)  # a refusal carries only why


def test_sequence_numbers_are_bounded_by_the_run() -> None:
    assert B.max_seq == P.seq_limit(SCEN.generation.new_tokens, len(SCEN.devices), len(SCEN.events), P.MAX_ATTEMPTS)
    assert B.max_rows == SCEN.final_length < S.context
    P.for_device({"t": P.ABORT, "rid": 1, "seq": B.max_seq}, SRC, ME, B)
    with pytest.raises(P.ProtocolError):
        P.for_device({"t": P.ABORT, "rid": 1, "seq": B.max_seq + 1}, SRC, ME, B)


# ------------------------------------------------------------------------------- fuzzing

HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=80), st.binary(max_size=64),
    st.lists(st.integers(-5, 3000), max_size=6), st.dictionaries(st.text(max_size=8), st.integers(), max_size=4),
    st.sampled_from([2**63, 2**64 - 1, -1, 0, 1e308, -1e-300, math.nan, math.inf, "ffn.0", "head.99.0", SRC, ME,
                     "mallory", [], {}, [0, 0], ["gateway", "gateway"]]),
    st.builds(lambda r, c, dt: torch.zeros(r, c, dtype=dt), st.integers(0, 40), st.sampled_from([0, 1, S.d_model, 7]),
              st.sampled_from([torch.float32, torch.float16, torch.int64])),
)


@st.composite
def _mutated(draw: st.DrawFn) -> tuple[dict[str, Any], str, str]:
    """A valid message of some kind with some fields replaced by hostile values (and
    sometimes a field dropped or added), sent by some device to some device."""
    raw = dict(_valid()[draw(st.sampled_from(sorted(_valid())))])
    keys = [k for k in raw if k != "t"]
    for k in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=len(keys), unique=True)):
        raw[k] = draw(HOSTILE)
    if draw(st.booleans()):
        raw.pop(draw(st.sampled_from(keys)), None)
    if draw(st.integers(0, 9)) == 0:
        raw[draw(st.text(max_size=6))] = draw(HOSTILE)
    names = [SRC, PEER, ME, "mallory"]
    return raw, draw(st.sampled_from(names)), draw(st.sampled_from(names[:3]))


def _within_bounds(m: P.Message) -> None:
    """What an accepted record may hold."""
    for name in ("seq",):
        v = getattr(m, name, None)
        assert v is None or 0 <= v <= B.max_seq
    for name in ("x", "out", "k"):
        v = getattr(m, name, None)
        if isinstance(v, torch.Tensor):
            assert v.shape[0] <= B.max_rows and v.dtype == torch.float32
    layer = getattr(m, "layer", None)
    assert layer is None or 0 <= layer < S.layers
    for name in ("at", "rate", "flops", "latency"):
        v = getattr(m, name, None)
        assert v is None or math.isfinite(v)


@FUZZ
@given(case=_mutated())
def test_fuzz_hostile_values_in_valid_shapes(case: tuple[dict[str, Any], str, str]) -> None:
    raw, sender, me = case
    for receive in (lambda: P.for_device(raw, sender, me, B), lambda: P.for_controller(raw, sender, B)):
        try:
            m = receive()
        except P.ProtocolError:
            continue
        _within_bounds(m)


@FUZZ
@given(blob=st.one_of(
    st.binary(max_size=512),
    st.builds(lambda v: msgpack.packb(v, use_bin_type=True), st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=20),
                  st.binary(max_size=20)),
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
        max_leaves=20)),
    # truncated and bit-flipped frames of real messages
    st.builds(lambda k, cut: encode(_valid()[k])[:cut], st.sampled_from(sorted(_valid())), st.integers(0, 400)),
    st.builds(lambda k, i: bytes(b ^ (0xFF if j == i else 0) for j, b in enumerate(encode(_valid()[k]))),
              st.sampled_from(sorted(_valid())), st.integers(0, 300)),
))
def test_fuzz_random_and_truncated_frames(blob: bytes) -> None:
    """Any bytes: the codec refuses them (FrameError) or the check does (ProtocolError)."""
    try:
        raw = decode(blob, 1 << 20)
    except FrameError:
        return
    for receive in (lambda: P.for_device(raw, PEER, ME, B), lambda: P.for_controller(raw, PEER, B)):
        try:
            _within_bounds(receive())
        except P.ProtocolError:
            pass


class _Port:
    source = SRC

    def send(self, dst: str, msg: dict[str, Any], at: float | None = None) -> None:
        pass

    def attach(self, handler: Any) -> None:
        pass

    async def settle(self, t: float) -> None:
        pass


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def token(self, row: dict[str, Any]) -> None:
        pass

    def event(self, t_s: float, token: int, kind: str, subject: str, detail: str) -> None:
        self.events.append((kind, subject, detail))

    def placement(self, token: int, changes: Any) -> None:
        pass


@settings(max_examples=EXAMPLES // 3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases=st.lists(st.one_of(_mutated(), st.tuples(
    st.sampled_from([_valid()[k] for k in sorted(P.TO_CONTROLLER)]), st.sampled_from([SRC, PEER, ME, "phone"]),
    st.just(SRC))), min_size=1, max_size=5))
def test_fuzz_the_controller_takes_anything(cases: list[tuple[dict[str, Any], str, str]]) -> None:
    """Whatever reaches the controller (an answer without rid among it), it never raises;
    a fault (the end of the run) only ever names the source device."""
    from testbed.agents.controller import Controller, Options
    from testbed.emulation.clock import run as run_loop
    from testbed.placement.resource_aware import ResourceAware

    async def main() -> None:
        class Hooks:
            async def on_epoch(self, k: int) -> None:
                pass

        async def oracle(*a: Any) -> Any:
            raise AssertionError("not asked")

        ctl = Controller(SCEN, S, ResourceAware(), _Port(), ([], torch.zeros(0, S.vocab)), [1, 2], _Recorder(), Hooks(),
                         Options(interval=4, telemetry="measured"), oracle)
        for raw, sender, _ in cases:
            ctl._on_message(sender, raw)
        assert ctl._fault is None or SRC in ctl._fault, ctl._fault

    run_loop(main, "virtual")
