"""Message types between agents (the `t` field of every frame) and their fields.

Data path (one attempt `seq` at one token; `pos` is the first position of the chunk):
  gen  GEN       {seq, tokens, pos}                   controller -> source: embed, fan out
  x    LAYER_IN  {seq, layer, pos, x[T, D]}            upstream -> head devices and proj device
  h    HEADS     {seq, layer, pos, groups, out[T, k*q*d]} head device -> proj device
  y    FFN_IN    {seq, layer, pos, x[T, D]}            proj device -> ffn device
  z    OUT       {seq, x[T, D]}                        last ffn device -> source (LM head)
  logits LOGITS  {seq, logits[V]}                      source -> controller (last position)
Control (controller -> device; every request has `rid` and is answered by an ACK with it):
  load     {rid, blocks}                 install blocks from local weights (deployment)
  route    {rid, version, devices, assign} routing table; frees blocks now routed elsewhere
  reserve  {rid, blocks: {name: bytes}}  reserve memory for incoming blocks
  cancel   {rid, blocks}                 drop reservations (a move that will not happen)
  migrate  {rid, block, to}              send a snapshot of the block to `to`
  block    {rid, block, w, k, v}         the snapshot (device -> device); the receiver ACKs
  abort    {rid, seq}                    drop attempts <= seq, answer when idle
  tel      {rid, probe_bytes}            report telemetry; probe links idle since the last report
  probe    {pad, n?}                     measurement traffic, dropped on arrival
To the controller:
  ack      {rid, ok, ...}                answer to a request
  err      {kind, device, ...}           oom (a refused cache append) or agent failure
  press    {device, memory, at}          unsolicited: usage crossed high, or a co-tenant
                                         took or returned memory
  linkx    {device, peer, rate, latency, at} unsolicited: a link's observed rate changed a lot
                                         (0: the link is down and holds our frames)
  down     {device}                      the source lost its connection to a device
  join     {device, memory, flops, host_blocks, at}  a new device announces itself
"""

GEN, LAYER_IN, HEADS, FFN_IN, OUT, LOGITS = "gen", "x", "h", "y", "z", "logits"
LOAD, ROUTE, RESERVE, CANCEL, MIGRATE, BLOCK, ABORT, TELEMETRY, PROBE = (
    "load", "route", "reserve", "cancel", "migrate", "block", "abort", "tel", "probe")
ACK, ERROR, PRESSURE, LINK_CHANGE, DOWN, JOIN = "ack", "err", "press", "linkx", "down", "join"

TO_CONTROLLER = frozenset((ACK, ERROR, PRESSURE, LINK_CHANGE, DOWN, JOIN, LOGITS))
DATA = frozenset((GEN, LAYER_IN, HEADS, FFN_IN, OUT))


class ProtocolError(Exception):
    """A message that the receiver cannot accept (unknown type, missing or bad field)."""


# ------------------------------------------------------------------ validation
# Everything that arrives over a transport is checked before an agent uses it: types,
# ranges, tensor shapes and sizes. A message that fails is refused (ProtocolError), logged
# and counted by the transport; the agent goes on.

import torch  # noqa: E402

from ..model.blocks import TORCH_DTYPES, block_shapes  # noqa: E402
from ..model.spec import Block, ModelSpec  # noqa: E402


def _int(m: dict, key: str, lo: int = 0, hi: int | None = None) -> int:
    v = m.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v >= hi):
        raise ProtocolError(f"{m.get('t')!r}: {key} must be an integer in [{lo}, {hi}), got {v!r}")
    return v


def _tensor(m: dict, key: str, shape: tuple[int | None, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
    v = m.get(key)
    if not isinstance(v, torch.Tensor):
        raise ProtocolError(f"{m.get('t')!r}: {key} must be a tensor")
    if v.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, v.shape, strict=True)):
        raise ProtocolError(f"{m.get('t')!r}: {key} has shape {tuple(v.shape)}, expected {shape}")
    if dtype is not None and v.dtype != dtype:
        raise ProtocolError(f"{m.get('t')!r}: {key} has dtype {v.dtype}, expected {dtype}")
    return v


def _block(m: dict, key: str, spec: ModelSpec) -> Block:
    v = m.get(key)
    try:
        b = Block.parse(v) if isinstance(v, str) else None
    except ValueError:
        b = None
    if b is None or b.layer >= spec.layers or b.index >= (spec.groups if b.kind == "head" else 1):
        raise ProtocolError(f"{m.get('t')!r}: {key} is not a block of this model: {v!r}")
    return b


def _names(m: dict, key: str) -> list:
    v = m.get(key)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ProtocolError(f"{m.get('t')!r}: {key} must be a list of strings")
    return v


def check(m: dict, spec: ModelSpec) -> None:
    """Refuse a device-bound message that is malformed for this model (ProtocolError)."""
    t, D, ctx = m.get("t"), spec.d_model, spec.context
    dt = TORCH_DTYPES[spec.dtype]
    if t in (GEN, LAYER_IN, HEADS, FFN_IN, OUT, ABORT):
        _int(m, "seq")
    if t in (LOAD, ROUTE, RESERVE, CANCEL, MIGRATE, BLOCK, ABORT, TELEMETRY):
        _int(m, "rid")
    if t == GEN:
        toks = m.get("tokens")
        if not isinstance(toks, list) or not 0 < len(toks) <= ctx or not all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < spec.vocab for x in toks):
            raise ProtocolError(f"'gen': tokens must be 1..{ctx} token ids below {spec.vocab}")
        _int(m, "pos", 0, ctx - len(toks) + 1)
    elif t in (LAYER_IN, FFN_IN, HEADS):
        _int(m, "layer", 0, spec.layers)
        pos = _int(m, "pos", 0, ctx)
        if t == HEADS:
            groups = m.get("groups")
            if (not isinstance(groups, list) or not groups or len(set(groups)) != len(groups)
                    or not all(isinstance(g, int) and 0 <= g < spec.groups for g in groups)):
                raise ProtocolError(f"'h': groups must be distinct group indices below {spec.groups}")
            x = _tensor(m, "out", (None, len(groups) * spec.q_per_group * spec.d_head), dt)
        else:
            x = _tensor(m, "x", (None, D), dt)
        if not 0 < x.shape[0] <= ctx - pos:
            raise ProtocolError(f"{t!r}: {x.shape[0]} positions from {pos} exceed the context of {ctx}")
    elif t == OUT:
        _tensor(m, "x", (None, D), dt)
    elif t in (LOAD, CANCEL):
        for name in _names(m, "blocks"):
            _block({"t": t, "b": name}, "b", spec)
    elif t == ROUTE:
        _int(m, "version")
        devices = _names(m, "devices")
        assign = m.get("assign")
        if (not isinstance(assign, list) or len(assign) != len(spec.blocks)
                or not all(isinstance(j, int) and 0 <= j < len(devices) for j in assign)):
            raise ProtocolError(f"'route': assign must give one of {len(devices)} devices to each of "
                                f"{len(spec.blocks)} blocks")
    elif t == RESERVE:
        blocks = m.get("blocks")
        if not isinstance(blocks, dict):
            raise ProtocolError("'reserve': blocks must be a map of block -> bytes")
        for name, n in blocks.items():
            _block({"t": t, "b": name}, "b", spec)
            _int({"t": t, "n": n}, "n")
    elif t == MIGRATE:
        _block(m, "block", spec)
        if not isinstance(m.get("to"), str):
            raise ProtocolError("'migrate': to must be a device name")
    elif t == BLOCK:
        b = _block(m, "block", spec)
        w = m.get("w")
        want = block_shapes(spec, b.kind)
        if not isinstance(w, dict) or set(w) != set(want):
            raise ProtocolError(f"'block': {b.name} must carry exactly {sorted(want)}")
        for name, shape in want.items():
            _tensor(w, name, shape, dt)
        if b.kind == "head":
            k = _tensor(m, "k", (None, spec.d_head), dt)
            v = _tensor(m, "v", (k.shape[0], spec.d_head), dt)
            if k.shape[0] > ctx:
                raise ProtocolError(f"'block': a cache of {v.shape[0]} positions exceeds the context")
    elif t == TELEMETRY:
        _int(m, "probe_bytes", 0, 1 << 20)
    elif t == PROBE:
        if not isinstance(m.get("pad"), bytes):
            raise ProtocolError("'probe': pad must be bytes")
        if "n" in m:
            _int(m, "n")
