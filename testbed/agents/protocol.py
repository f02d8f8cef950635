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
  probe    {pad}                         measurement traffic, dropped on arrival
To the controller:
  ack      {rid, ok, ...}                answer to a request
  err      {kind, device, ...}           oom (a refused cache append) or agent failure
  press    {device, memory, at}          unsolicited: usage crossed high, or a co-tenant
                                         took or returned memory
  linkx    {device, peer, rate, latency} unsolicited: a link's observed rate changed a lot
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
