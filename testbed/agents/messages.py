"""The messages between agents and the controller: one frozen record per kind, decoded and
checked in one place for every channel and direction, and one table of kinds.

Data path (one attempt `seq` at one token; `pos` is the first position of the chunk); the
wire kind (one byte on the link, never renamed), its constant and record, and its fields:
  gen    GEN / Gen                   {seq, tokens, pos}          controller -> source: embed, fan out
  x      LAYER_INPUT / LayerInput    {seq, layer, pos, x[T, D]}  upstream -> head devices and proj device
  h      HEAD_OUTPUTS / HeadOutputs  {seq, layer, pos, groups, out[T, k*q*d]}  head device -> proj device
  y      FFN_INPUT / FfnInput        {seq, layer, pos, x[T, D]}  proj device -> ffn device (each
                                     device of an ffn shard of the layer, when sharded)
  f      FFN_PARTIAL / FfnPartial    {seq, layer, pos, shards, x[T, D]}  device of ffn shards ->
                                     device of shard 0: the sum of those shards' partial outputs
  z      LAST_HIDDEN / LastHidden    {seq, x[T, D]}              last ffn device -> source (LM head)
  logits LOGITS / Logits             {seq, logits[V], at}        source -> controller (last position)
Control (controller -> device; every request has `rid` and is answered by an ACK with it):
  load     {rid, blocks}                 install blocks from local weights (deployment)
  route    {rid, version, devices, assign} routing table; frees blocks now routed elsewhere
  reserve  {rid, blocks: {name: bytes}}  reserve memory for incoming blocks
  cancel   {rid, blocks}                 drop reservations (a move that will not happen)
  migrate  {rid, block, to, since?, upto?} send a snapshot of the block to `to` (a pre-copy
                                         stage: cache positions [since, upto))
  block    {rid, block, w, k, v, since?} the snapshot (device -> device); the receiver ACKs
  abort    {rid, seq}                    drop attempts <= seq, answer when idle
  tel      {rid, probe_bytes}            report telemetry; probe links idle since the last report
  probe    {pad, n?}                     measurement traffic, dropped on arrival
To the controller:
  ack      {rid, ok, device, ...}        answer to a request (what it carries: `REPLY`)
  err      {kind, device, ...}           oom (a refused cache append) or agent failure
  press    {device, memory, at}          unsolicited: usage crossed high, or a co-tenant
                                         took or returned memory
  linkx    {device, peer, rate, latency, at} unsolicited: a link's observed rate changed a lot
                                         (0: the link is down and holds our frames)
  down     {device}                      the source lost its connection to a device
  join     {device, memory, flops, host_blocks, at}  a new device announces itself

Every message is checked before use, wherever it comes from (a peer's websocket, the
in-process network, the agent itself, the runner's control channel, a relay to the
controller): `for_device` and `for_controller` turn a wire map into the kind's record or
raise ProtocolError. A record checks its fields against `Bounds` taken from the scenario
and the model: sequence numbers within what the run can use, positions and rows within
the run's length (and the context), block names and tensor shapes of this model, device
names of this run, sizes within the receiving device, finite numbers; and who may send
it (controller requests only from the source device, reports only about the sender). The
receiver counts and logs a refusal and goes on.

The checks are written here rather than with a validation library: the bounds come from
the run, tensors are torch tensors the codec already built, and on the data path a check
is a handful of comparisons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from ..common.units import MIB
from ..emulation.memory import CATEGORIES
from ..model.blocks import TORCH_DTYPES, block_shapes
from ..model.spec import Block, ModelSpec
from ..scenario.format import MAX_DEVICES, MAX_MEMORY_MIB
from ..scenario.records import Scenario
from .errors import ProtocolError

GEN, LAYER_INPUT, HEAD_OUTPUTS, FFN_INPUT, LAST_HIDDEN, LOGITS = "gen", "x", "h", "y", "z", "logits"
FFN_PARTIAL = "f"
LOAD, ROUTE, RESERVE, CANCEL, MIGRATE, BLOCK, ABORT, TELEMETRY, PROBE = (
    "load", "route", "reserve", "cancel", "migrate", "block", "abort", "tel", "probe")
ACK, ERROR, PRESSURE, LINK_CHANGE, DOWN, JOIN = "ack", "err", "press", "linkx", "down", "join"

TO_CONTROLLER = frozenset((ACK, ERROR, PRESSURE, LINK_CHANGE, DOWN, JOIN, LOGITS))
DATA = frozenset((GEN, LAYER_INPUT, HEAD_OUTPUTS, FFN_INPUT, FFN_PARTIAL, LAST_HIDDEN))
FROM_CONTROLLER = frozenset((GEN, LOAD, ROUTE, RESERVE, CANCEL, MIGRATE, ABORT, TELEMETRY))

MAX_ID = 1 << 62  # request ids and route versions
MAX_PROBE = 16 * MIB  # bytes of padding in a probe
MAX_TEXT = 4096  # characters of a free-text detail
MAX_BYTES = int(MAX_MEMORY_MIB * MIB)  # any memory figure
MAX_COUNT = 1 << 62  # event counters
MIN_FLOPS = 1e-300  # a measured rate is only checked to be positive: devices may be very slow


# attempts at one token before the run fails: the controller's bound and the agents' bound on
# the sequence numbers it may use, which must agree (one more attempt than the agents allow
# would have them refuse the controller)
MAX_ATTEMPTS = 8


def seq_limit(new_tokens: int, devices: int, events: int, max_attempts: int) -> int:
    """The highest attempt number a run can reach: every token, every recovery replay and
    every re-join may be retried `max_attempts` times (doubled for slack)."""
    return 2 * (new_tokens + devices + events + 1) * (max_attempts + 1)


@dataclass(frozen=True)
class Bounds:
    """What a receiver accepts: the run's model, source, devices (None: any well-formed
    name, for an agent outside a run), highest sequence number, and rows (positions) a
    message may carry."""

    model: ModelSpec
    source: str
    devices: frozenset[str] | None = None
    max_seq: int = 1 << 31
    max_rows: int = 0  # 0: the model's context

    def __post_init__(self) -> None:
        rows = self.model.context if self.max_rows <= 0 else min(self.max_rows, self.model.context)
        object.__setattr__(self, "max_rows", rows)

    @classmethod
    def for_run(cls, scen: Scenario, max_attempts: int = MAX_ATTEMPTS) -> Bounds:
        names = [d.name for d in scen.devices] + list(scen.joins())
        return cls(scen.model, scen.source, frozenset(names),
                   seq_limit(scen.generation.new_tokens, len(names), len(scen.events), max_attempts),
                   scen.final_length)

    def known(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return name in self.devices if self.devices is not None else 0 < len(name) <= 64

    def max_frame(self) -> int:
        """The largest frame a peer can legitimately send here: a block's snapshot with its
        cache at the run's length, a prefill's hidden states, or a probe; with slack."""
        s, n = self.model, self.max_rows
        item = s.bytes_per_elem
        block = max(sum(math.prod(v) for v in block_shapes(s, k).values()) for k in ("head", "proj", "ffn"))
        largest = max(block * item + 2 * n * s.d_head * item, n * s.d_model * item, s.vocab * 4, MAX_PROBE)
        return int(largest * 1.25) + (1 << 20)


# ---------------------------------------------------------------------------------- fields


def show(v: object) -> str:
    """A value for an error message: short, whatever a peer sent."""
    text = repr(v)
    return text if len(text) <= 48 else text[:45] + "..."


class _Fields:
    """Typed reads from one wire map; every failure names the kind and the key."""

    def __init__(self, m: dict[str, Any], kind: str) -> None:
        self.m, self.kind = m, kind

    def fail(self, key: str, why: str) -> ProtocolError:
        return ProtocolError(f"{self.kind!r}: {key}: {why}")

    def int_(self, key: str, lo: int, hi: int, value: object = None, given: bool = False) -> int:
        v = value if given else self.m.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise self.fail(key, f"must be an integer in [{lo}, {hi}], got {show(v)}")
        return v

    def num(self, key: str, lo: float, hi: float = math.inf, optional: bool = False,
            value: object = None, given: bool = False) -> float | None:
        v = value if given else self.m.get(key)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
            raise self.fail(key, f"must be a finite number in [{lo:g}, {hi:g}], got {show(v)}")
        return float(v)

    def bool_(self, key: str) -> bool:
        v = self.m.get(key)
        if not isinstance(v, bool):
            raise self.fail(key, f"must be true or false, got {show(v)}")
        return v

    def text(self, key: str, optional: bool = False) -> str | None:
        v = self.m.get(key)
        if v is None and optional:
            return None
        if not isinstance(v, str) or len(v) > MAX_TEXT:
            raise self.fail(key, f"must be text of at most {MAX_TEXT} characters, got {show(v)}")
        return v

    def seq(self, b: Bounds, key: str = "seq") -> int:
        return self.int_(key, 0, b.max_seq)

    def rid(self) -> int:
        return self.int_("rid", 0, MAX_ID)

    def device(self, key: str, b: Bounds, value: object = None, given: bool = False) -> str:
        v = value if given else self.m.get(key)
        if not b.known(v):
            raise self.fail(key, f"not a device of this run: {show(v)}")
        return v  # type: ignore[return-value]  # known() accepts only a str

    def block(self, key: str, b: Bounds, value: object = None, given: bool = False) -> str:
        v = value if given else self.m.get(key)
        try:
            blk = Block.parse(v) if isinstance(v, str) and len(v) <= 32 else None
        except ValueError:
            blk = None
        s = b.model
        if blk is None or blk.name not in s.block_names:
            raise self.fail(key, f"not a block of this model: {show(v)}")
        return blk.name

    def blocks(self, key: str, b: Bounds) -> tuple[str, ...]:
        v = self.m.get(key)
        if not isinstance(v, list) or len(v) > len(b.model.blocks):
            raise self.fail(key, f"must be a list of at most {len(b.model.blocks)} block names")
        out = tuple(self.block(key, b, x, True) for x in v)
        if len(set(out)) != len(out):
            raise self.fail(key, "names a block twice")
        return out

    def tensor(self, key: str, shape: tuple[int | None, ...], dtype: torch.dtype,
               rows: tuple[int, int] | None = None, src: dict[str, Any] | None = None) -> torch.Tensor:
        """A tensor of this dtype and shape (None: any length); `rows` bounds the first
        dimension."""
        v = (self.m if src is None else src).get(key)
        if not isinstance(v, torch.Tensor):
            raise self.fail(key, "must be a tensor")
        if v.dim() != len(shape) or any(want is not None and want != got
                                        for want, got in zip(shape, v.shape, strict=True)):
            raise self.fail(key, f"has shape {tuple(v.shape)}, expected {shape}")
        if v.dtype != dtype:
            raise self.fail(key, f"has dtype {v.dtype}, expected {dtype}")
        if rows is not None and not rows[0] <= v.shape[0] <= rows[1]:
            raise self.fail(key, f"has {v.shape[0]} rows, expected {rows[0]} to {rows[1]}")
        return v

    def counters(self, key: str = "memory") -> MappingProxyType:
        """A device's memory counters (MemoryBudget.counters())."""
        v = self.m.get(key)
        if not isinstance(v, dict) or set(v) != COUNTERS:
            raise self.fail(key, f"must map exactly {sorted(COUNTERS)} to integers")
        for k, x in v.items():
            self.int_(f"{key}.{k}", 0, MAX_BYTES if k.endswith("bytes") or k in ("current", "peak")
                      else MAX_COUNT, x, True)
        return MappingProxyType(dict(v))

    def extra(self, allowed: frozenset[str]) -> None:
        unknown = set(self.m) - allowed - {"t"}
        if unknown:
            raise ProtocolError(f"{self.kind!r}: unexpected field(s) {show(sorted(map(str, unknown)))}")


# a device's memory counters (MemoryBudget.counters()): the events, the limits, and the bytes
# held per category
COUNTERS = frozenset(("current", "peak", "high", "max", "oom", "max_bytes", "high_bytes",
                      *(f"{c}_bytes" for c in CATEGORIES)))


# ---------------------------------------------------------------------------------- records


class Message:
    """Base of every record: a frozen dataclass whose fields are the message's, stated once:
    the keys its wire map may hold (`wire_keys`) are its fields, and a sender builds the
    record and sends `wire()`. Read as attributes (an answer's fields: `Ack.reply`)."""

    __slots__ = ()
    KIND: ClassVar[str]
    # who may send it: "controller" (from the source device), "device" (any device of the
    # run), "sender" (a device reporting about itself), "source" (the source's own report)
    FROM: ClassVar[str]

    @property
    def t(self) -> str:
        return self.KIND

    @classmethod
    def wire_keys(cls) -> frozenset[str]:
        """The keys its wire map may hold besides "t": the record's fields."""
        return frozenset(f.name for f in fields(cls))  # type: ignore[arg-type]  # every subclass is a dataclass; the base is not

    def answered_by(self, device: str) -> frozenset[str]:
        """Who may acknowledge this request when it is sent to `device`."""
        return frozenset((device,))

    def wire(self) -> dict[str, Any]:
        """The wire map: "t", then every field in order; an optional field (one whose
        default is None) is left out when it is None, a required one is sent as None."""
        out: dict[str, Any] = {"t": self.KIND}
        for name, optional in _layout(type(self)):
            v = getattr(self, name)
            if v is not None or not optional:
                out[name] = _plain(v)
        return out

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> Message:
        raise NotImplementedError


def _layout(cls: type[Message]) -> tuple[tuple[str, bool], ...]:
    """A record's fields in order, each with whether it is optional (defaults to None)."""
    layout = _LAYOUTS.get(cls)
    if layout is None:
        layout = _LAYOUTS[cls] = tuple((f.name, f.default is None) for f in fields(cls))  # type: ignore[arg-type]  # every subclass is a dataclass; the base is not
    return layout


_LAYOUTS: dict[type[Message], tuple[tuple[str, bool], ...]] = {}


def _plain(v: Any) -> Any:
    """A record's value as wire data (read-only maps and tuples become maps and lists)."""
    if isinstance(v, MappingProxyType | dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


def _rows(f: _Fields, b: Bounds, pos: int) -> tuple[int, int]:
    """Rows a chunk starting at `pos` may have: at least one, none past the run's length."""
    if pos >= b.max_rows:
        raise f.fail("pos", f"{pos} is past the run's {b.max_rows} positions")
    return 1, b.max_rows - pos


@dataclass(frozen=True, slots=True)
class Gen(Message):
    KIND, FROM = GEN, "controller"
    seq: int
    tokens: tuple[int, ...]
    pos: int

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> Gen:
        toks = f.m.get("tokens")
        pos = f.int_("pos", 0, b.max_rows - 1)
        lo, hi = _rows(f, b, pos)
        if not isinstance(toks, list) or not lo <= len(toks) <= hi:
            raise f.fail("tokens", f"must be a list of {lo} to {hi} token ids")
        for x in toks:
            f.int_("tokens[]", 0, b.model.vocab - 1, x, True)
        return cls(f.seq(b), tuple(toks), pos)


@dataclass(frozen=True, slots=True)
class LayerInput(Message):
    """x (a layer's input) and y (proj's output, ffn's input): the same fields."""

    KIND, FROM = LAYER_INPUT, "device"
    seq: int
    layer: int
    pos: int
    x: torch.Tensor

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> LayerInput:
        s = b.model
        pos = f.int_("pos", 0, b.max_rows - 1)
        x = f.tensor("x", (None, s.d_model), TORCH_DTYPES[s.dtype], _rows(f, b, pos))
        return cls(f.seq(b), f.int_("layer", 0, s.layers - 1), pos, x)


@dataclass(frozen=True, slots=True)
class FfnInput(LayerInput):
    KIND = FFN_INPUT


@dataclass(frozen=True, slots=True)
class HeadOutputs(Message):
    KIND, FROM = HEAD_OUTPUTS, "device"
    seq: int
    layer: int
    pos: int
    groups: tuple[int, ...]
    out: torch.Tensor

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> HeadOutputs:
        s = b.model
        groups = f.m.get("groups")
        if not isinstance(groups, list) or not 0 < len(groups) <= s.groups or len(set(map(repr, groups))) != len(groups):
            raise f.fail("groups", f"must be distinct group indices below {s.groups}")
        for g in groups:
            f.int_("groups[]", 0, s.groups - 1, g, True)
        pos = f.int_("pos", 0, b.max_rows - 1)
        out = f.tensor("out", (None, len(groups) * s.q_per_group * s.d_head), TORCH_DTYPES[s.dtype], _rows(f, b, pos))
        return cls(f.seq(b), f.int_("layer", 0, s.layers - 1), pos, tuple(groups), out)


@dataclass(frozen=True, slots=True)
class FfnPartial(Message):
    KIND, FROM = FFN_PARTIAL, "device"
    seq: int
    layer: int
    pos: int
    shards: tuple[int, ...]
    x: torch.Tensor

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> FfnPartial:
        s = b.model
        shards = f.m.get("shards")
        if (not s.sharded or not isinstance(shards, list) or not 0 < len(shards) < s.ffn_shards
                or len(set(map(repr, shards))) != len(shards)):
            raise f.fail("shards", f"must be distinct ffn shard indices from 1 to {s.ffn_shards - 1}")
        for k in shards:
            f.int_("shards[]", 1, s.ffn_shards - 1, k, True)
        pos = f.int_("pos", 0, b.max_rows - 1)
        x = f.tensor("x", (None, s.d_model), TORCH_DTYPES[s.dtype], _rows(f, b, pos))
        return cls(f.seq(b), f.int_("layer", 0, s.layers - 1), pos, tuple(shards), x)


@dataclass(frozen=True, slots=True)
class LastHidden(Message):
    KIND, FROM = LAST_HIDDEN, "device"
    seq: int
    x: torch.Tensor

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> LastHidden:
        x = f.tensor("x", (None, b.model.d_model), TORCH_DTYPES[b.model.dtype], (1, b.max_rows))
        return cls(f.seq(b), x)


@dataclass(frozen=True, slots=True)
class Logits(Message):
    KIND, FROM = LOGITS, "source"
    seq: int
    logits: torch.Tensor
    at: float | None = None

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> Logits:
        return cls(f.seq(b), f.tensor("logits", (b.model.vocab,), torch.float32),
                   f.num("at", -math.inf, math.inf, optional=True))


@dataclass(frozen=True, slots=True)
class Load(Message):
    KIND, FROM = LOAD, "controller"
    rid: int
    blocks: tuple[str, ...]

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> Load:
        return cls(f.rid(), f.blocks("blocks", b))


@dataclass(frozen=True, slots=True)
class Cancel(Load):
    KIND = CANCEL


@dataclass(frozen=True, slots=True)
class Route(Message):
    KIND, FROM = ROUTE, "controller"
    rid: int
    version: int
    devices: tuple[str, ...]
    assign: tuple[int, ...]

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> Route:
        devices, assign = f.m.get("devices"), f.m.get("assign")
        if not isinstance(devices, list) or not 0 < len(devices) <= MAX_DEVICES or len(set(map(repr, devices))) != len(devices):
            raise f.fail("devices", f"must list 1 to {MAX_DEVICES} distinct devices")
        for d in devices:
            f.device("devices[]", b, d, True)
        n = len(b.model.blocks)
        if (not isinstance(assign, list) or len(assign) != n
                or not all(isinstance(j, int) and not isinstance(j, bool) and 0 <= j < len(devices) for j in assign)):
            raise f.fail("assign", f"must give one of the {len(devices)} devices to each of {n} blocks")
        return cls(f.rid(), f.int_("version", 0, MAX_ID), tuple(devices), tuple(assign))


@dataclass(frozen=True, slots=True)
class Reserve(Message):
    KIND, FROM = RESERVE, "controller"
    rid: int
    blocks: MappingProxyType  # block -> bytes

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> Reserve:
        v = f.m.get("blocks")
        if not isinstance(v, dict) or len(v) > len(b.model.blocks):
            raise f.fail("blocks", "must map at most every block of the model to a size in bytes")
        # sizes the device cannot hold are answered (refused), not a protocol error: the
        # controller may ask for more than is free; only nonsense is refused here
        out = {f.block("blocks", b, k, True): f.int_(f"blocks.{k}", 0, MAX_BYTES, n, True) for k, n in v.items()}
        return cls(f.rid(), MappingProxyType(out))


@dataclass(frozen=True, slots=True)
class Migrate(Message):
    KIND, FROM = MIGRATE, "controller"
    rid: int
    block: str
    to: str
    # a pre-copy stage (testbed/placement/precopy.py): send cache positions [since, upto)
    # (and the weights when since is 0); both absent: the whole block (stop-and-copy)
    since: int | None = None
    upto: int | None = None

    def answered_by(self, device: str) -> frozenset[str]:
        """Its destination, once the block is installed; its source, when it cannot send."""
        return frozenset((device, self.to))

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> Migrate:
        since = upto = None
        if "since" in f.m or "upto" in f.m:
            upto = f.int_("upto", 0, b.max_rows)
            since = f.int_("since", 0, upto)
        return cls(f.rid(), f.block("block", b), f.device("to", b), since, upto)


@dataclass(frozen=True, slots=True)
class BlockSnapshot(Message):
    """A migrated block: its weights and, for a head, its K/V cache; a pre-copy stage
    (`since` given) carries positions since.. of the cache, and the weights only when
    `since` is 0."""

    KIND, FROM = BLOCK, "device"
    rid: int
    block: str
    w: MappingProxyType
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    since: int | None = None

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> BlockSnapshot:
        name = f.block("block", b)
        blk = Block.parse(name)
        kind = blk.kind
        dt = TORCH_DTYPES[b.model.dtype]
        since = f.int_("since", 0, b.max_rows) if "since" in f.m else None
        w, want = f.m.get("w"), block_shapes(b.model, kind, blk.index)
        if since:  # a later pre-copy stage: entries only
            want = {}
        if not isinstance(w, dict) or set(w) != set(want):
            raise f.fail("w", f"{name} must carry exactly {sorted(want)}")
        weights = {k: f.tensor(k, shape, dt, src=w) for k, shape in want.items()}
        k = v = None
        if kind == "head":
            k = f.tensor("k", (None, b.model.d_head), dt, (0, b.max_rows))
            v = f.tensor("v", (k.shape[0], b.model.d_head), dt)
            if since is not None and since + k.shape[0] > b.max_rows:
                raise f.fail("k", f"positions {since} to {since + k.shape[0]} are beyond the run's {b.max_rows}")
        elif "k" in f.m or "v" in f.m:
            raise f.fail("k", f"{name} has no cache")
        return cls(f.rid(), name, MappingProxyType(weights), k, v, since)


@dataclass(frozen=True, slots=True)
class Abort(Message):
    KIND, FROM = ABORT, "controller"
    rid: int
    seq: int

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> Abort:
        return cls(f.rid(), f.seq(b))


@dataclass(frozen=True, slots=True)
class Telemetry(Message):
    KIND, FROM = TELEMETRY, "controller"
    rid: int
    probe_bytes: int

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> Telemetry:
        return cls(f.rid(), f.int_("probe_bytes", 0, (1 << 20) - 1))


@dataclass(frozen=True, slots=True)
class Probe(Message):
    KIND, FROM = PROBE, "device"
    pad: bytes
    n: int | None = None

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> Probe:
        pad = f.m.get("pad")
        if not isinstance(pad, bytes) or len(pad) > MAX_PROBE:
            raise f.fail("pad", f"must be at most {MAX_PROBE} bytes")
        return cls(pad, f.int_("n", 0, MAX_ID) if "n" in f.m else None)


# what an acknowledgement may carry beyond rid, ok and device, by field; and which fields
# the answer to each request must carry
def _links(f: _Fields, b: Bounds) -> MappingProxyType:
    v = f.m.get("links")
    if not isinstance(v, dict) or len(v) > MAX_DEVICES:
        raise f.fail("links", "must map peers to observations")
    out = {}
    for peer, obs in v.items():
        f.device("links", b, peer, True)
        if not isinstance(obs, dict) or set(obs) != {"rate", "latency", "bytes"}:
            raise f.fail(f"links.{peer}", "must give rate, latency and bytes")
        out[peer] = MappingProxyType({"rate": f.num("rate", 0, math.inf, True, obs["rate"], True),
                                      "latency": f.num("latency", 0, math.inf, True, obs["latency"], True),
                                      "bytes": f.int_("bytes", 0, MAX_COUNT, obs["bytes"], True)})
    return MappingProxyType(out)


def _names(f: _Fields, b: Bounds, key: str) -> tuple[str, ...]:
    return f.blocks(key, b)


def _refused(f: _Fields, b: Bounds) -> Any:
    v = f.m.get("refused")
    if isinstance(v, dict):  # load: block -> why
        if len(v) > len(b.model.blocks):
            raise f.fail("refused", "names more blocks than the model has")
        return MappingProxyType({f.block("refused", b, k, True): _detail(f, k, why) for k, why in v.items()})
    return f.blocks("refused", b)  # reserve: the blocks refused


def _detail(f: _Fields, key: str, v: object) -> str:
    if not isinstance(v, str) or len(v) > MAX_TEXT:
        raise f.fail(f"refused.{key}", f"must be text of at most {MAX_TEXT} characters")
    return v


REPLY_FIELDS: dict[str, Any] = {
    "loaded": lambda f, b: _names(f, b, "loaded"),
    "refused": _refused,
    "freed": lambda f, b: _names(f, b, "freed"),
    "reserved": lambda f, b: _names(f, b, "reserved"),
    "available": lambda f, b: f.int_("available", -MAX_BYTES, MAX_BYTES),
    "block": lambda f, b: f.block("block", b),
    "bytes": lambda f, b: f.int_("bytes", 0, MAX_BYTES),
    "detail": lambda f, b: f.text("detail"),
    "at": lambda f, b: f.num("at", -math.inf),
    "memory": lambda f, b: f.counters(),
    "kv": lambda f, b: f.int_("kv", 0, MAX_BYTES),
    "weights": lambda f, b: f.int_("weights", 0, MAX_BYTES),
    "flops": lambda f, b: f.num("flops", MIN_FLOPS, 1e18),
    "links": _links,
}
REPLY: dict[str, frozenset[str]] = {  # request -> what its successful answer carries
    LOAD: frozenset(("loaded", "refused")),
    ROUTE: frozenset(("freed",)),
    RESERVE: frozenset(("reserved", "refused", "available")),
    CANCEL: frozenset(),
    MIGRATE: frozenset(),
    ABORT: frozenset(),
    TELEMETRY: frozenset(("at", "memory", "kv", "weights", "flops", "links")),
}


@dataclass(frozen=True, slots=True)
class Ack(Message):
    KIND, FROM = ACK, "sender"
    rid: int
    ok: bool
    device: str
    reply: MappingProxyType  # the answer's fields (REPLY_FIELDS)

    @classmethod
    def wire_keys(cls) -> frozenset[str]:
        """rid, ok, device, and on the wire beside them the answer's fields."""
        return frozenset(("rid", "ok", "device", *REPLY_FIELDS))

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> Ack:
        reply = {k: REPLY_FIELDS[k](f, b) for k in REPLY_FIELDS if k in f.m}
        return cls(f.rid(), f.bool_("ok"), f.device("device", b), MappingProxyType(reply))

    def wire(self) -> dict[str, Any]:
        return {"t": ACK, "rid": self.rid, "ok": self.ok, "device": self.device, **_plain(self.reply)}

    def answers(self, request: str) -> None:
        """Refuse (ProtocolError) a successful answer that lacks what `request` needs."""
        missing = REPLY.get(request, frozenset()) - set(self.reply) if self.ok else frozenset()
        if missing:
            raise ProtocolError(f"'ack' to {request!r}: missing {sorted(missing)}")
        if request in (LOAD, RESERVE) and "refused" in self.reply and \
                isinstance(self.reply["refused"], MappingProxyType) != (request == LOAD):
            raise ProtocolError(f"'ack' to {request!r}: refused has the wrong form")


@dataclass(frozen=True, slots=True)
class Error(Message):
    KIND, FROM = ERROR, "sender"
    kind: str
    device: str
    detail: str | None = None
    seq: int | None = None
    layer: int | None = None
    bytes: int | None = None
    memory: MappingProxyType | None = None
    at: float | None = None

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> Error:
        kind = f.m.get("kind")
        if kind not in ("oom", "agent"):
            raise f.fail("kind", f"must be oom or agent, got {show(kind)}")
        device, detail = f.device("device", b), f.text("detail", optional=True)
        if kind == "agent":
            return cls(kind, device, detail)
        return cls(kind, device, detail, f.seq(b), f.int_("layer", 0, b.model.layers - 1),
                   f.int_("bytes", 0, MAX_BYTES), f.counters(), f.num("at", -math.inf))


@dataclass(frozen=True, slots=True)
class Pressure(Message):
    KIND, FROM = PRESSURE, "sender"
    device: str
    memory: MappingProxyType
    at: float

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> Pressure:
        return cls(f.device("device", b), f.counters(), f.num("at", -math.inf))  # type: ignore[arg-type]  # num() is None only when optional


@dataclass(frozen=True, slots=True)
class LinkChange(Message):
    KIND, FROM = LINK_CHANGE, "sender"
    device: str
    peer: str
    rate: float
    latency: float | None
    at: float

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> LinkChange:
        device, peer = f.device("device", b), f.device("peer", b)
        if peer == device:
            raise f.fail("peer", "a link joins two different devices")
        return cls(device, peer, f.num("rate", 0), f.num("latency", 0, optional=True),  # type: ignore[arg-type]  # num() is None only when optional
                   f.num("at", -math.inf))  # type: ignore[arg-type]  # num() is None only when optional


@dataclass(frozen=True, slots=True)
class Down(Message):
    KIND, FROM = DOWN, "source"
    device: str

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> Down:
        device = f.device("device", b)
        if device == b.source:
            raise f.fail("device", "the source cannot report itself gone")
        return cls(device)


@dataclass(frozen=True, slots=True)
class Join(Message):
    KIND, FROM = JOIN, "sender"
    device: str
    memory: MappingProxyType
    flops: float
    host_blocks: bool
    at: float

    @classmethod
    def parse(cls, f: _Fields, b: Bounds) -> Join:
        return cls(f.device("device", b), f.counters(), f.num("flops", MIN_FLOPS, 1e18),  # type: ignore[arg-type]  # num() is None only when optional
                   f.bool_("host_blocks"), f.num("at", -math.inf))  # type: ignore[arg-type]  # num() is None only when optional


# ---------------------------------------------------------------------------------- the table

TABLE: dict[str, type[Message]] = {c.KIND: c for c in (
    Gen, LayerInput, FfnInput, HeadOutputs, FfnPartial, LastHidden, Logits, Load, Cancel, Route, Reserve, Migrate, BlockSnapshot, Abort,
    Telemetry, Probe, Ack, Error, Pressure, LinkChange, Down, Join)}
assert set(TABLE) == DATA | TO_CONTROLLER | FROM_CONTROLLER | {BLOCK, PROBE}


def kind_of(raw: object) -> str:
    """The kind a wire map claims, for counting refusals ('?' when it is not one we know)."""
    t = raw.get("t") if isinstance(raw, dict) else None
    return t if isinstance(t, str) and t in TABLE else "?"


def _parse(raw: object, b: Bounds) -> Message:
    if not isinstance(raw, dict):
        raise ProtocolError(f"a message must be a map, got {type(raw).__name__}")
    cls = TABLE.get(raw.get("t"))  # type: ignore[arg-type]  # any value: a non-str is simply not found
    if cls is None:
        raise ProtocolError(f"unknown message kind {show(raw.get('t'))}")
    f = _Fields(raw, cls.KIND)
    f.extra(cls.wire_keys())
    return cls.parse(f, b)


def for_device(raw: object, sender: str, me: str, b: Bounds) -> Message:
    """A message that arrived at device `me` from `sender` (a peer, or `me` itself: the
    agent's own pipeline or, on the source, the controller's port), checked; ProtocolError
    if it may not be accepted. Messages for the controller pass through the source device:
    they are checked here and again by the controller."""
    m = _parse(raw, b)
    if not b.known(sender):
        raise ProtocolError(f"{m.KIND!r} from an unknown sender {show(sender)}")
    if m.FROM == "controller" and sender != b.source:
        raise ProtocolError(f"{m.KIND!r} comes from the controller, not from {sender}")
    if m.KIND in (GEN, LAST_HIDDEN) and me != b.source:
        raise ProtocolError(f"{m.KIND!r} is for the source device, not {me}")
    if m.FROM == "source":  # the source's own reports never travel as messages
        raise ProtocolError(f"{m.KIND!r} is the source's own report, not a message")
    if m.FROM == "sender" and m.device != sender:  # type: ignore[attr-defined]  # every "sender" record has a device
        raise ProtocolError(f"{m.KIND!r} about {m.device} sent by {sender}")  # type: ignore[attr-defined]  # as above
    if m.KIND in TO_CONTROLLER and me != b.source:
        raise ProtocolError(f"{m.KIND!r} is for the controller, which {me} does not run")
    return m


def for_controller(raw: object, sender: str, b: Bounds) -> Message:
    """A message that reached the controller (from its source device's agent, in this
    process or relayed from another), checked; ProtocolError if it may not be accepted."""
    m = _parse(raw, b)
    if m.KIND not in TO_CONTROLLER:
        raise ProtocolError(f"{m.KIND!r} is not a message for the controller")
    if not b.known(sender):
        raise ProtocolError(f"{m.KIND!r} from an unknown sender {show(sender)}")
    if m.FROM == "source" and sender != b.source:
        raise ProtocolError(f"{m.KIND!r} comes from the source device, not from {sender}")
    if m.FROM == "sender" and m.device != sender:  # type: ignore[attr-defined]  # every "sender" record has a device
        raise ProtocolError(f"{m.KIND!r} about {m.device} sent by {sender}")  # type: ignore[attr-defined]  # as above
    return m
