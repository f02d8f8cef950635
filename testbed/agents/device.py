"""Device agent: holds blocks and their caches, computes on request, accounts memory,
reports telemetry, sends and receives migrated blocks. It never decides placement.

A thin asyncio shell: the arithmetic is in the model blocks, the memory budget, the compute
unit and the cost model; messages are listed in `messages.py`. Compute runs as tasks that
the device's `ComputeUnit` serialises (one job at a time, FIFO).

Data path per token and layer (routing comes from the controller's `route` message):
`x` -> the heads of the layer held here run as one job -> `h` to proj's device; proj's
device waits for the residual and every group's output -> `y` to ffn's device -> `x` for
the next layer to its head devices and proj device, or `z` back to the source.
With ffn shards, `y` goes to every device holding a shard of the layer; each runs its
shards as one job, and all but shard 0's device send the sum as `f` to shard 0's device,
which adds the residual and every sum (`shards.ShardJoin`) and sends `x` or `z` on.
Every data message carries `seq` (one attempt at one token); after an `abort` the agent
drops anything at or below it, so a retried token never mixes with a stale attempt.

Everything that arrives goes through `handle`: the protocol's check (`messages.for_device`,
whoever sent it, the agent itself included), then the handler of its kind (`_HANDLERS`). A
refused message is counted and logged (`refusals`) and changes nothing. What a peer can
make the agent hold is bounded per peer: the partial inputs of `proj` it contributes to
and the jobs it has queued, each at most `quota` (twice what a pipeline ever has in flight).

Computing early (real clock, in process: `compute_early`): a data frame's content reaches
its receiver when it is sent (`preview`), or when the job producing it has its result (at
the start of that job's window, not its end); the receiver starts the arithmetic on its
worker thread at once, without touching its state (`HeadBlock.attend` returns the K/V rows
instead of writing them). The frame still arrives at its emulated time, and its job's
window commits the result then: rows appended, memory charged, the result released at the
window's end, so every emulated figure is what it would have been. A result computed for
blocks that are no longer the ones here (moved, lost, replaced) is dropped, as are those of
aborted attempts; a job whose early result is missing computes it in its window. With ffn
shards, each device's shards of a layer compute early like any job, and shard 0's device
adds the content of the residual and of the partial sums as it arrives (`shards.EarlySums`:
the sum made at arrival, so the same bits), handing the layer's output on early.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import MappingProxyType
from typing import Any, TypeVar

import torch

from ..emulation.compute import Ahead, ComputeUnit
from ..emulation.link import EmulatedLink
from ..emulation.memory import MemoryBudget, MemoryRefused
from ..model import cost
from ..model.blocks import (
    FfnBlock,
    HeadBlock,
    KVCache,
    ProjBlock,
    SourceBlock,
    WeightSource,
    concat_heads,
    make_block,
    next_token,
    sum_partials,
)
from ..model.spec import ModelSpec
from ..scenario.records import DeviceSpec
from ..transport.refusals import Refusals
from . import messages as P
from .admission import Quota
from .join import ProjectionJoin, ProjInputs
from .routing import Routing
from .shards import EarlySums, ShardJoin

log = logging.getLogger(__name__)

Send = Callable[[str, dict[str, Any], float | None], int]  # (destination, message, at) -> bytes
Outgoing = Callable[[], dict[str, EmulatedLink]]  # peer -> this device's link to it

AnyBlock = HeadBlock | ProjBlock | FfnBlock
T = TypeVar("T")


class DeviceAgent:
    def __init__(self, spec: DeviceSpec, model: ModelSpec, weights: WeightSource, send: Send,
                 source: str, outgoing: Outgoing | None = None, bounds: P.Bounds | None = None) -> None:
        self.name = spec.name
        self.spec = spec
        self.model = model
        # what this agent accepts: the run's bounds (a bare agent, e.g. in a test, accepts
        # any device name and the model's context)
        self.bounds = bounds or P.Bounds(model, source)
        self.refusals = Refusals(spec.name, log)
        self.quota = 2 * model.layers + 4  # proj inputs and queued jobs per peer
        self.admission = Quota(self.quota, "{sender} has {limit} jobs queued here already")
        self._work: set[asyncio.Task[Any]] = set()  # jobs queued for peers (an abort waits for them)
        self._acks: set[asyncio.Task[Any]] = set()  # answers to aborts, waiting for the jobs
        self.weights = weights
        self._send = send
        self._outgoing = outgoing or dict
        self.source = source  # where the controller runs
        self.budget = MemoryBudget(spec.name, spec.memory_bytes, spec.memory_high_bytes)
        # the source device holds the embedding, final norm and LM head (not placeable)
        self.source_block: SourceBlock | None = None
        if spec.name == source:
            self.source_block = SourceBlock(model, weights.source())
            self.budget.charge("fixed", sum(t.nbytes for t in self.source_block.w.values()))
        self.budget.on_high = self.budget.on_pressure = self._pressure
        self.compute = ComputeUnit(spec.name, spec.flops, spec.bandwidth)
        self.blocks: dict[str, AnyBlock] = {}
        self.reserved: dict[str, int] = {}
        # blocks arriving by pre-copy: installed and charged, not routed here until the
        # switch (a `route` that places them here makes them `blocks`; `cancel` drops them)
        self.incoming: dict[str, AnyBlock] = {}
        self.routing = Routing(model, spec.name)
        self.floor = -1  # attempts <= floor are stale
        self.join = ProjectionJoin(model.groups, model.q_per_group * model.d_head, self.quota)
        self.ffn_join = ShardJoin(model.ffn_shards, self.quota)  # sums of ffn shards (sharded models)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = False  # after stop(): no new work (the run is over or interrupted)
        # on the source only: (sender, message, its emulated arrival or None)
        self.controller: Callable[[str, dict[str, Any], float | None], None] | None = None
        self._tel_since = -math.inf
        # measurement traffic arriving: (sender, the probe, loop time) to whoever listens
        self.on_probe: Callable[[str, P.Probe, float], None] | None = None
        self._jobs_at_tel = (0.0, 0.0)  # (flops, busy seconds) at the last report
        # computing early (real clock, `compute_early`): a worker thread, and the arithmetic
        # it started per job key, with the blocks it used
        self._pool: ThreadPoolExecutor | None = None
        # per job key: (the blocks and the input tensors it used, its arithmetic)
        self._early: dict[tuple[Any, ...], tuple[tuple[object, ...], tuple[torch.Tensor, ...], Future[Ahead]]] = {}
        self._early_max = 2 * len(model.blocks) + 8  # a token's jobs here, twice over
        self._pview: dict[tuple[int, int], ProjInputs] = {}  # proj's inputs seen early
        self._sums = EarlySums(model.ffn_shards, self.quota)  # ffn shards' sums seen early (shard 0 here)
        self._loop: asyncio.AbstractEventLoop | None = None  # where the worker's results are handed on
        # hands a message's content to another device ahead of its frame (set by the world)
        self.early_send: Callable[[str, dict[str, Any]], None] | None = None
        # on the source: the attempt under way and the position its next token would take
        # (the next token's content is known as soon as this attempt's logits are)
        self._next_pos: tuple[int, int] | None = None
        # layer inputs seen early whose heads here lack the previous position's K/V rows
        # (committed at that job's window), or are not routed here yet: tried again when the
        # rows are committed or the routing changes, latest per layer
        self._pending: dict[int, tuple[str, dict[str, Any]]] = {}
        # on the source: the next token's content handed on early (`_next_token_early`),
        # handed on again to layer 0's devices when a re-plan routes them elsewhere
        self._guess: dict[str, Any] | None = None
        self._due: float | None = None  # the emulated arrival of the message being handled

    # ------------------------------------------------------------------ plumbing

    def send(self, dst: str, msg: dict[str, Any], at: float | None = None) -> int:
        """Send from this device; `at` is the emulated time it is handed over (the end of
        the job that produced it), default now."""
        return self._send(dst, msg, at)

    def _reply(self, rid: int, ok: bool, **answer: Any) -> None:
        """Answer request `rid`; `answer`: the fields the request's answer carries (`P.REPLY`).
        A request answered while it is handled leaves as of its emulated arrival (`_due`):
        control traffic follows the emulated timeline, not the host's delay in handing it
        over."""
        self.send(self.source, P.Ack(rid, ok, self.name, MappingProxyType(answer)).wire(), self._due)

    def _spawn(self, coro: Coroutine[Any, Any, Any], sender: str | None = None) -> asyncio.Task[Any]:
        """Run coro as a task; `sender`: a job queued on behalf of that peer's message
        (counted against its quota, which the caller checked with `_admit`)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        if sender is not None:
            self.admission.take(sender)
            self._work.add(task)
            task.add_done_callback(lambda t: self._unqueue(sender, t))
        task.add_done_callback(self._task_done)
        return task

    def _admit(self, sender: str) -> None:
        """A peer may have at most `quota` jobs queued here (ProtocolError beyond)."""
        self.admission.check(sender)

    def _unqueue(self, sender: str, task: asyncio.Task[Any]) -> None:
        self._work.discard(task)
        self.admission.give(sender)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s: task failed", self.name, exc_info=exc)
            self.send(self.source, P.Error("agent", self.name, f"{type(exc).__name__}: {exc}").wire())

    def _pressure(self) -> None:
        """Crossing high, or a co-tenant taking or returning memory, is a pressure signal:
        tell the controller at once (as memory.high / PSI notifications would)."""
        self.send(self.source, P.Pressure(self.name, MappingProxyType(self.budget.counters()),
                                          asyncio.get_running_loop().time()).wire())

    def link_changed(self, peer: str, rate: float, latency: float | None) -> None:
        """A link of ours streams at a very different rate than before: tell the controller."""
        self.send(self.source, P.LinkChange(self.name, peer, rate, latency, asyncio.get_running_loop().time()).wire())

    def peer_down(self, peer: str, at: float | None = None) -> None:
        """The transport lost its connection to a peer (as of loop time `at`, when known;
        otherwise now); the source tells the controller."""
        if self.source_block is not None and self.controller is not None:
            self.controller(self.name, P.Down(peer).wire(), at)

    def announce(self) -> None:
        """A joining device introduces itself to the controller (via the source)."""
        self.send(self.source, P.Join(self.name, MappingProxyType(self.budget.counters()), self.compute.rate,
                                      self.spec.host_blocks, asyncio.get_running_loop().time()).wire())

    def handle(self, sender: str, msg: dict[str, Any], at: float | None = None) -> None:
        """Entry point for every message addressed to this device, from a peer or from
        itself; `at` is when it was due (its emulated arrival; default now), which is when
        the work it asks for may start. A message that is refused is counted and logged.
        A stopped agent takes nothing: frames still in flight when a run ends or is
        interrupted would otherwise start tasks that nobody cancels."""
        if self._stopped:
            return
        try:
            m = P.for_device(msg, sender, self.name, self.bounds)
            if m.KIND in P.TO_CONTROLLER:  # on the source: checked here, then the controller's
                if self.controller is None:
                    raise P.ProtocolError(f"{self.name} runs no controller")
                self.controller(sender, msg, at)
                return
            self._due = at
            try:
                _HANDLERS[type(m)](self, sender, m, at)
            finally:
                self._due = None
        except P.ProtocolError as e:
            self.refused(sender, P.kind_of(msg), str(e))

    def refused(self, sender: str, kind: str, why: str) -> None:
        self.refusals.refuse(sender if self.bounds.known(sender) else "?", kind, why,
                             asyncio.get_running_loop().time())

    def halt(self) -> None:
        """The device dies abruptly: it takes no more messages and every job in flight is
        cancelled (nothing it was computing is sent)."""
        self._stopped = True
        for task in list(self._tasks):
            task.cancel()

    async def stop(self) -> None:
        self.halt()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._drop_early(math.inf)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ computing early

    def compute_early(self) -> None:
        """Compute as soon as a data frame's content arrives (`preview`), on a worker thread
        (torch releases the GIL; the loop's timers stay on time), ahead of the frame's
        emulated arrival; the job's window still opens at the arrival and commits the result
        then (cache rows, memory), so every emulated figure stays what it was. For the real
        clock: on the virtual clock the host's time is not seen, and nothing is gained."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-early")
            self._loop = asyncio.get_running_loop()

    def preview(self, sender: str, msg: dict[str, Any]) -> None:
        """The content of a data frame whose emulated arrival is still ahead: start the
        arithmetic of the job it will ask for, if its blocks are here. A frame that would
        be refused, or a job that cannot start yet, is left to its arrival."""
        if self._pool is None or self._stopped or msg.get("t") not in _EARLY_KINDS:
            return
        try:
            m = P.for_device(msg, sender, self.name, self.bounds)
        except P.ProtocolError:
            return  # refused, and counted, when it arrives
        if getattr(m, "seq", -1) <= self.floor:
            return
        key: tuple[Any, ...]
        blocks: tuple[object, ...]
        if isinstance(m, P.HeadOutputs):
            self._preview_proj(m.seq, m.layer, m.pos, None, m.groups, m.out)
            return
        if isinstance(m, P.FfnPartial):
            self._preview_sum(m.seq, m.layer, m.pos, m.shards, m.x)
            return
        if type(m) is P.LayerInput and self.routing.proj_here(m.layer):  # (FfnInput is a LayerInput too)
            self._preview_proj(m.seq, m.layer, m.pos, m.x)
        if type(m) is P.LayerInput:
            groups = self.routing.my_heads(m.layer)
            found = [self.blocks.get(f"head.{m.layer}.{g}") for g in groups]
            heads = [h for h in found if isinstance(h, HeadBlock)]
            if not heads or len(heads) != len(found) or not all(h.cache.n >= m.pos for h in heads):
                # the rows before it are not committed yet, or the heads are not routed here
                # yet (the content of a token's start can arrive before its routing)
                self._pending[m.layer] = (sender, msg)
                return
            key, blocks, inputs = ("x", m.seq, m.layer, m.pos, tuple(groups)), tuple(heads), (m.x,)
            work: Callable[[], Any] = _attend(heads, m.x, m.pos)
        elif isinstance(m, P.FfnInput) and self.model.sharded:
            shards = self.routing.my_shards(m.layer)
            found = [self.blocks.get(self.model.ffn_name(m.layer, k)) for k in shards]
            ffns = [b for b in found if isinstance(b, FfnBlock)]
            if not ffns or len(ffns) != len(found):
                return  # not routed or not loaded here: left to its arrival
            if shards[0] == 0:
                self._preview_sum(m.seq, m.layer, m.pos, None, m.x)  # the residual, for the sum
            key, blocks, inputs = ("s", m.seq, m.layer, m.pos, tuple(shards)), tuple(ffns), (m.x,)
            work = _partials(ffns, m.x)
        elif isinstance(m, P.FfnInput):
            ffn = self.blocks.get(f"ffn.{m.layer}")
            if not isinstance(ffn, FfnBlock):
                return
            key, blocks, inputs = ("y", m.seq, m.layer, m.pos), (ffn,), (m.x,)
            work = _ffn(ffn, m.x)
        elif isinstance(m, P.LastHidden) and self.source_block is not None:
            key, blocks, inputs = ("z", m.seq), (self.source_block,), (m.x,)
            work = _logits(self.source_block, m.x)
        else:
            return
        self._submit(key, blocks, inputs, work)

    def _submit(self, key: tuple[Any, ...], blocks: tuple[object, ...], inputs: tuple[torch.Tensor, ...],
                work: Callable[[], Any]) -> None:
        """Start a job's arithmetic on the worker; when it is done, its outputs' content goes
        on at once (the next job's arithmetic can start before this job's window opens)."""
        assert self._pool is not None and self._loop is not None
        if key in self._early:
            return
        if len(self._early) >= self._early_max:  # bounded: the oldest is dropped (computed on arrival)
            self._early.pop(next(iter(self._early)))[2].cancel()
        loop = self._loop
        fut = self._pool.submit(_quiet(work, loop))
        self._early[key] = (blocks, inputs, fut)

        def done(f: Future[Ahead]) -> None:
            if not f.cancelled() and f.exception() is None and f.result().value is not None:
                try:
                    loop.call_soon_threadsafe(self._early_outputs, key, f.result().value)
                except RuntimeError:  # the loop has closed: the run is over, nobody waits for it
                    pass
        fut.add_done_callback(done)

    def _early_outputs(self, key: tuple[Any, ...], value: Any) -> None:
        """The messages the job of `key` will send, from its early result, previewed."""
        if self._stopped or key[1] <= self.floor:
            return
        kind, seq = key[0], key[1]
        try:
            if kind == "x":
                _, _, layer, pos, groups = key
                out = value[0][0] if len(value) == 1 else torch.cat([o for o, _, _ in value], dim=-1)
                targets = [(self.routing.proj(layer), P.HeadOutputs(seq, layer, pos, tuple(groups), out).wire())]
            elif kind == "p":
                _, _, layer, pos = key
                msg = P.FfnInput(seq, layer, pos, value).wire()
                targets = [(dst, msg) for dst in self.routing.ffn_targets(layer)]
            elif kind == "y":
                _, _, layer, pos = key
                targets = self._layer_output(seq, layer, pos, value)
            elif kind == "s":
                _, _, layer, pos, shards = key
                targets = self._shard_result(seq, layer, pos, shards, value, early=True)
            elif kind == "z":
                self._next_token_early(seq, value)
                return
            else:
                return
        except KeyError:  # routed elsewhere since: the job itself will find out
            return
        self._hand_on_early(targets)

    def _hand_on_early(self, targets: list[tuple[str, dict[str, Any]]]) -> None:
        """Content known early goes to its receivers' previews (ours directly)."""
        for dst, msg in targets:
            if dst == self.name:
                self.preview(self.name, msg)
            elif self.early_send is not None:
                self.early_send(dst, msg)

    def _next_token_early(self, seq: int, logits: torch.Tensor) -> None:
        """On the source: the next token's layer input, as soon as this attempt's logits are
        known. The controller takes the most likely token (`Controller._produce`) and, unless
        something intervenes, asks for it as the next attempt at the next position; its
        content goes to layer 0's previews now, so the next token's first jobs run ahead
        like every other job instead of starting from nothing at each token's start. A
        guess that turns out wrong (a replay, an abort, a new routing) is dropped where its
        job would use it (`_take_early` compares blocks and content)."""
        nxt = self._next_pos
        src = self.source_block
        if nxt is None or nxt[0] != seq or src is None or self._stopped or seq <= self.floor:
            return
        if self._guess is not None and self._guess["seq"] == seq + 1:
            return  # handed on already (the early result, then the window's)
        pos = nxt[1]
        if seq + 1 > self.bounds.max_seq or pos >= self.bounds.max_rows:
            return  # past the run: there is no next token
        with torch.inference_mode():
            x = src.embed([next_token(logits)], pos)
        self._guess = P.LayerInput(seq + 1, 0, pos, x).wire()
        self._hand_on_guess()

    def _hand_on_guess(self) -> None:
        if self._guess is None or self._guess["seq"] <= self.floor:
            return
        try:
            targets = [(dst, self._guess) for dst in self.routing.layer_targets(0)]
        except KeyError:
            return
        self._hand_on_early(targets)

    def _ahead(self, seq: int, outputs: Callable[[torch.Tensor], list[tuple[str, dict[str, Any]]]]
               ) -> Callable[[torch.Tensor], None] | None:
        """When computing early: a job's result is known when its window opens, long before
        it is released at the window's end; its receivers get the content then (`preview`),
        so a chain of jobs runs ahead as far as the data allows."""
        if self._pool is None:
            return None

        def ahead(y: torch.Tensor) -> None:
            if seq <= self.floor or self._stopped:
                return
            try:
                targets = outputs(y)
            except KeyError:  # not routed (any more): the release at the end will say so
                return
            self._hand_on_early(targets)
        return ahead

    def _preview_proj(self, seq: int, layer: int, pos: int, x: torch.Tensor | None,
                      groups: Sequence[int] = (), out: torch.Tensor | None = None) -> None:
        """Collect proj's inputs as they arrive early; start it when all are there."""
        block = self.blocks.get(f"proj.{layer}")
        if not isinstance(block, ProjBlock) or not self.routing.proj_here(layer):
            return
        buf = self._pview.get((seq, layer))
        if buf is None:
            if len(self._pview) >= self.quota:
                self._pview.pop(next(iter(self._pview)))
            buf = self._pview[(seq, layer)] = ProjInputs()
        if x is not None:
            buf.residual = x
        if out is not None:
            buf.add_outputs(groups, out, self.join.width)
        if buf.residual is None or not buf.complete(self.model.groups):
            return
        del self._pview[(seq, layer)]
        if self._pool is not None:
            bx, outs, groups_n = buf.residual, buf.outputs, self.model.groups

            def work() -> torch.Tensor:
                return block.forward(concat_heads(outs, groups_n), bx)
            self._submit(("p", seq, layer, pos), (block,), (bx, *(outs[g] for g in range(groups_n))), work)

    def _preview_sum(self, seq: int, layer: int, pos: int, shards: Sequence[int] | None, x: torch.Tensor) -> None:
        """On the device of a layer's ffn shard 0: collect the residual (`shards` None) and
        the partial sums as their content arrives early; once all are there, the layer's
        output goes on early. The sum costs no emulated compute (as `_ffn_sum`): no job."""
        if 0 not in self.routing.my_shards(layer):
            return
        key = (seq, layer)
        entry = self._sums.add_residual(key, x) if shards is None else self._sums.add_partial(key, shards, x)
        if entry is None:
            return
        with torch.inference_mode():
            out = entry.output()
        try:
            targets = self._layer_output(seq, layer, pos, out)
        except KeyError:  # routed elsewhere since: the sum at arrival will find out
            return
        self._hand_on_early(targets)

    def _take_early(self, key: tuple[Any, ...], blocks: Sequence[object],
                    inputs: Sequence[torch.Tensor]) -> Future[Ahead] | None:
        """The arithmetic started early for this job, if it used exactly these blocks and
        these inputs (the frame's content as it arrived)."""
        if not self._early:
            return None
        entry = self._early.pop(key, None)
        if entry is None:
            return None
        used, seen, fut = entry
        if (len(used) != len(blocks) or any(a is not b for a, b in zip(used, blocks, strict=False))
                or len(seen) != len(inputs) or not all(torch.equal(a, b) for a, b in zip(seen, inputs, strict=False))):
            fut.cancel()  # the block left or came back since, or other content: the result is dropped
            return None
        return fut

    def _drop_early(self, floor: float) -> None:
        for key in [k for k in self._early if k[1] <= floor]:
            self._early.pop(key)[2].cancel()
        for pkey in [k for k in self._pview if k[0] <= floor]:
            del self._pview[pkey]
        self._sums.drop_through(floor)
        for layer in [n for n, (_, msg) in self._pending.items() if msg["seq"] <= floor]:
            del self._pending[layer]
        if self._guess is not None and self._guess["seq"] <= floor:
            self._guess = None

    # ------------------------------------------------------------------ state

    def _head(self, name: str) -> HeadBlock:
        block = self.blocks[name]
        assert isinstance(block, HeadBlock), name
        return block

    def kv_bytes(self) -> int:
        return sum(b.cache.nbytes for b in (*self.blocks.values(), *self.incoming.values()) if isinstance(b, HeadBlock))

    def weight_bytes(self) -> int:
        """Weights of the placeable blocks held here (the source's fixed share apart), those
        arriving by pre-copy included."""
        return sum(t.nbytes for b in (*self.blocks.values(), *self.incoming.values()) for t in b.w.values())

    def cache_lengths(self) -> dict[str, int]:
        return {n: b.cache.n for n, b in self.blocks.items() if isinstance(b, HeadBlock)}

    def _install(self, name: str, w: dict[str, torch.Tensor], cache: KVCache | None = None,
                 into: dict[str, AnyBlock] | None = None) -> int:
        """Charge and install a block (into `blocks`, or `into`); MemoryRefused leaves
        nothing installed."""
        block = make_block(self.model, name, w)
        if cache is not None and isinstance(block, HeadBlock):
            block.cache = cache
        wbytes = sum(t.nbytes for t in w.values())
        kbytes = cache.nbytes if cache is not None else 0
        self.budget.charge("weights", wbytes)
        try:
            self.budget.charge("kv", kbytes)
        except MemoryRefused:
            self.budget.release("weights", wbytes)
            raise
        (self.blocks if into is None else into)[name] = block
        return wbytes + kbytes

    def _free(self, name: str, where: dict[str, AnyBlock] | None = None) -> None:
        block = (self.blocks if where is None else where).pop(name)
        self.budget.release("weights", sum(t.nbytes for t in block.w.values()))
        if isinstance(block, HeadBlock):
            self.budget.release("kv", block.cache.nbytes)

    # ------------------------------------------------------------------ data path

    def _on_gen(self, sender: str, m: P.Gen, at: float | None) -> None:
        """Start an attempt: embed the tokens (a table lookup, no emulated compute) and send
        the hidden states to layer 0's devices."""
        if self.source_block is None:
            raise P.ProtocolError(f"{self.name} is not the source device")
        if m.seq <= self.floor:
            return
        if not self.routing.routed:
            raise P.ProtocolError("no routing yet")
        with torch.inference_mode():
            x = self.source_block.embed(list(m.tokens), m.pos)
        self._next_pos = (m.seq, m.pos + len(m.tokens))
        msg = P.LayerInput(m.seq, 0, m.pos, x).wire()
        if self._pool is not None and self.name in self.routing.layer_targets(0):
            self.preview(self.name, msg)  # computing early: on the worker, like any other input
        for dst in self.routing.layer_targets(0):
            self._forward(dst, msg, at)

    def _on_last_hidden(self, sender: str, m: P.LastHidden, at: float | None) -> None:
        if self.source_block is None:
            raise P.ProtocolError(f"{self.name} is not the source device")
        if m.seq > self.floor:
            self._admit(sender)
            self._spawn(self._lm_head(m.seq, m.x, at), sender)

    async def _lm_head(self, seq: int, x: torch.Tensor, ready: float | None) -> None:
        src = self.source_block
        assert src is not None

        work = _logits(src, x)
        early = self._take_early(("z", seq), (src,), (x,))
        ahead = (lambda logits: self._next_token_early(seq, logits)) if self._pool is not None else None
        logits, done = await self.compute.run(cost.source_flops(self.model), _or_now(work) if early else work,
                                              ready=ready, early=early, on_result=ahead,
                                              nbytes=cost.source_bytes(self.model))
        if seq > self.floor and self.controller is not None:
            self.controller(self.name, P.Logits(seq, logits, done).wire(), done)

    def _on_layer_input(self, sender: str, m: P.LayerInput, at: float | None) -> None:
        seq, layer = m.seq, m.layer
        if seq <= self.floor:
            return
        groups = self.routing.my_heads(layer)
        proj = self.routing.proj_here(layer)
        if not groups and not proj:
            raise P.ProtocolError(f"layer {layer} is not routed here")
        if groups:
            if any(f"head.{layer}.{g}" not in self.blocks for g in groups):
                raise P.ProtocolError(f"layer {layer}'s heads routed here are not loaded")
            self._admit(sender)
        if proj:  # before the job: a refused buffer leaves nothing half done
            self.join.add_residual((seq, layer), sender, at, m.x)
        if groups:
            self._spawn(self._heads(seq, layer, m.pos, m.x, groups, at), sender)
        if proj:
            self._check_proj(seq, layer, m.pos, sender)

    async def _heads(self, seq: int, layer: int, pos: int, x: torch.Tensor, groups: list[int],
                     ready: float | None) -> None:
        s = self.model
        T = x.shape[0]
        heads = [self._head(f"head.{layer}.{g}") for g in groups]
        grow = sum(max(0, pos + T - h.cache.n) for h in heads) * cost.cache_bytes_per_token(s)
        try:
            self.budget.charge("kv", grow)
        except MemoryRefused as e:
            self.send(self.source, P.Error("oom", self.name, str(e), seq, layer, e.nbytes,
                                           MappingProxyType(self.budget.counters()),
                                           asyncio.get_running_loop().time()).wire())
            return

        attend = _attend(heads, x, pos)

        def commit(parts: list[tuple[torch.Tensor, ...]] | None = None) -> torch.Tensor:
            """The window's state change: the K/V rows appended (computed now if not early)."""
            parts = attend() if parts is None else parts
            with torch.inference_mode():
                for h, (_, k, v) in zip(heads, parts, strict=True):
                    h.cache.write(pos, k, v)
                if self._pending.get(layer) is not None:
                    self.preview(*self._pending.pop(layer))  # its rows are there now
                return parts[0][0] if len(parts) == 1 else torch.cat([o for o, _, _ in parts], dim=-1)

        def outputs(out: torch.Tensor) -> list[tuple[str, dict[str, Any]]]:
            return [(self.routing.proj(layer), P.HeadOutputs(seq, layer, pos, tuple(groups), out).wire())]

        early = self._take_early(("x", seq, layer, pos, tuple(groups)), heads, (x,))
        out, done = await self.compute.run(len(groups) * cost.span_flops(s, "head", pos, T), commit,
                                           ready=ready, early=early, on_result=self._ahead(seq, outputs),
                                           nbytes=len(groups) * cost.span_bytes(s, "head", pos, T))
        if seq > self.floor:
            for dst, msg in outputs(out):
                self._forward(dst, msg, done)

    def _on_head_outputs(self, sender: str, m: P.HeadOutputs, at: float | None) -> None:
        seq, layer = m.seq, m.layer
        if seq <= self.floor:
            return
        if not self.routing.proj_here(layer):
            raise P.ProtocolError(f"proj.{layer} is not routed here")
        self.join.add_outputs((seq, layer), sender, at, m.groups, m.out)
        self._check_proj(seq, layer, m.pos, sender)

    def _check_proj(self, seq: int, layer: int, pos: int, sender: str) -> None:
        if not self.join.ready((seq, layer)):
            return
        inputs = self.join.take((seq, layer))
        assert inputs.residual is not None
        if f"proj.{layer}" not in self.blocks:
            raise P.ProtocolError(f"proj.{layer} is routed here but not loaded")
        if inputs.residual.shape[0] != inputs.outputs[0].shape[0]:
            raise P.ProtocolError(f"proj.{layer}: inputs of different lengths")
        self._admit(sender)
        self._spawn(self._run_block(seq, layer, pos, "proj", inputs.residual, inputs.outputs, inputs.due), sender)

    def _on_ffn_input(self, sender: str, m: P.FfnInput, at: float | None) -> None:
        if m.seq <= self.floor:
            return
        if self.model.sharded:
            self._on_ffn_shards_input(sender, m, at)
            return
        if not self.routing.ffn_here(m.layer) or f"ffn.{m.layer}" not in self.blocks:
            raise P.ProtocolError(f"ffn.{m.layer} is not here")
        self._admit(sender)
        self._spawn(self._run_block(m.seq, m.layer, m.pos, "ffn", m.x, None, at), sender)

    async def _run_block(self, seq: int, layer: int, pos: int, kind: str, x: torch.Tensor,
                         outs: dict[int, torch.Tensor] | None, ready: float | None) -> None:
        s = self.model
        block = self.blocks[f"{kind}.{layer}"]

        def work() -> torch.Tensor:
            with torch.inference_mode():
                if isinstance(block, ProjBlock):
                    assert outs is not None
                    return block.forward(concat_heads(outs, s.groups), x)
                assert isinstance(block, FfnBlock)
                return block.forward(x)

        def outputs(y: torch.Tensor) -> list[tuple[str, dict[str, Any]]]:
            if kind == "proj":
                fmsg = P.FfnInput(seq, layer, pos, y).wire()
                return [(dst, fmsg) for dst in self.routing.ffn_targets(layer)]
            return self._layer_output(seq, layer, pos, y)

        early = (self._take_early(("y", seq, layer, pos), (block,), (x,)) if kind == "ffn" else
                 self._take_early(("p", seq, layer, pos), (block,), (x, *(outs[g] for g in range(s.groups))))
                 if outs is not None else None)
        y, done = await self.compute.run(cost.span_flops(s, kind, pos, x.shape[0]), _or_now(work) if early else work,
                                         ready=ready, early=early, on_result=self._ahead(seq, outputs),
                                         nbytes=cost.span_bytes(s, kind, pos, x.shape[0]))
        if seq <= self.floor:
            return
        for dst, msg in outputs(y):
            self._forward(dst, msg, done)

    def _layer_output(self, seq: int, layer: int, pos: int, y: torch.Tensor) -> list[tuple[str, dict[str, Any]]]:
        """Where a layer's output goes: the next layer's devices, or the source after the last."""
        if layer + 1 < self.model.layers:
            msg = P.LayerInput(seq, layer + 1, pos, y).wire()  # one map to every target: encoded once
            return [(dst, msg) for dst in self.routing.layer_targets(layer + 1)]
        return [(self.source, P.LastHidden(seq, y).wire())]

    def _on_ffn_shards_input(self, sender: str, m: P.FfnInput, at: float | None) -> None:
        """Proj's output reached a device holding ffn shards of the layer: run them; shard
        0's device keeps the residual for the sum."""
        shards = self.routing.my_shards(m.layer)
        if not shards or any(self.model.ffn_name(m.layer, k) not in self.blocks for k in shards):
            raise P.ProtocolError(f"the ffn shards of layer {m.layer} routed here are not loaded")
        self._admit(sender)
        if shards[0] == 0:
            self.ffn_join.add_residual((m.seq, m.layer), sender, at, m.x)
        self._spawn(self._shards(m.seq, m.layer, m.pos, m.x, shards, at), sender)

    async def _shards(self, seq: int, layer: int, pos: int, x: torch.Tensor, shards: list[int],
                      ready: float | None) -> None:
        """This device's ffn shards of a layer as one job: the sum of their partial outputs,
        to shard 0's device (ourselves included)."""
        s = self.model
        blocks = [self.blocks[s.ffn_name(layer, k)] for k in shards]
        work = _partials([b for b in blocks if isinstance(b, FfnBlock)], x)

        def outputs(y: torch.Tensor) -> list[tuple[str, dict[str, Any]]]:
            return self._shard_result(seq, layer, pos, shards, y, early=True)

        early = self._take_early(("s", seq, layer, pos, tuple(shards)), blocks, (x,))
        T = x.shape[0]
        y, done = await self.compute.run(len(shards) * cost.span_flops(s, "ffn", pos, T),
                                         _or_now(work) if early else work, ready=ready, early=early,
                                         on_result=self._ahead(seq, outputs),
                                         nbytes=len(shards) * cost.span_bytes(s, "ffn", pos, T))
        if seq <= self.floor:
            return
        for dst, msg in self._shard_result(seq, layer, pos, shards, y, done):
            self._forward(dst, msg, done)

    def _shard_result(self, seq: int, layer: int, pos: int, shards: Sequence[int], y: torch.Tensor,
                      at: float | None = None, early: bool = False) -> list[tuple[str, dict[str, Any]]]:
        """Where the sum of this device's ffn shards of a layer (a `_shards` job's result)
        goes. Shard 0 here: into the layer's sum here (`_ffn_sum`, as of `at`; `early`: its
        content, `_preview_sum`), nothing to send. Else: an FfnPartial to shard 0's device,
        returned (the job sends it; `early`: its content is handed on)."""
        if shards[0] == 0:
            if early:
                self._preview_sum(seq, layer, pos, shards, y)
            else:
                self._ffn_sum(self.name, seq, layer, pos, shards, y, at)
            return []
        return [(self.routing.ffn(layer), P.FfnPartial(seq, layer, pos, tuple(shards), y).wire())]

    def _on_ffn_partial(self, sender: str, m: P.FfnPartial, at: float | None) -> None:
        if m.seq <= self.floor:
            return
        if 0 not in self.routing.my_shards(m.layer):
            raise P.ProtocolError(f"{self.model.ffn_name(m.layer)} is not routed here")
        self._ffn_sum(sender, m.seq, m.layer, m.pos, m.shards, m.x, at)

    def _ffn_sum(self, sender: str, seq: int, layer: int, pos: int, shards: Sequence[int], y: torch.Tensor,
                 at: float | None) -> None:
        """One partial sum in; when every shard's is here, the layer's output goes on (the
        additions are not priced as compute: D values per shard)."""
        key = (seq, layer)
        self.ffn_join.add_partial(key, sender, at, shards, y)
        if not self.ffn_join.ready(key):
            return
        entry = self.ffn_join.take(key)
        self._sums.forget(key)
        with torch.inference_mode():
            out = entry.output()
        for dst, msg in self._layer_output(seq, layer, pos, out):
            self._forward(dst, msg, entry.due)

    def _forward(self, dst: str, msg: dict[str, Any], at: float | None = None) -> None:
        """Data onwards at emulated time `at`: to ourselves at once, else over the link."""
        if dst == self.name:
            self.handle(self.name, msg, at)
        else:
            self.send(dst, msg, at)

    # ------------------------------------------------------------------ control

    def _on_load(self, sender: str, m: P.Load, at: float | None = None) -> None:
        ok, refused = [], {}
        for name in m.blocks:
            if name in self.blocks:
                ok.append(name)  # loaded already (a repeated request): nothing to charge twice
                continue
            try:
                self._install(name, self.weights.block(name))
                ok.append(name)
            except MemoryRefused as e:
                refused[name] = str(e)
        self._reply(m.rid, not refused, loaded=ok, refused=refused)

    def _on_route(self, sender: str, m: P.Route, at: float | None = None) -> None:
        self.routing.set(m.devices, m.assign, m.version)
        for name in [n for n in self.incoming if self.routing.host(n) == self.name]:
            self.blocks[name] = self.incoming.pop(name)  # a pre-copy's switch
        freed = []
        for b in self.model.blocks:
            if self.routing.host(b.name) != self.name and b.name in self.blocks:
                self._free(b.name)
                freed.append(b.name)
        self._reply(m.rid, True, freed=freed)
        if self._pool is not None:  # computing early: content that waited for this routing
            for layer in list(self._pending):
                self.preview(*self._pending.pop(layer))
            self._hand_on_guess()  # on the source: the next token's content, to its new devices

    def _on_reserve(self, sender: str, m: P.Reserve, at: float | None = None) -> None:
        ok, refused = [], []
        for name, nbytes in m.blocks.items():
            if name in self.reserved or name in self.blocks or name in self.incoming or not self.budget.fits(nbytes):
                refused.append(name)
                continue
            self.budget.charge("reserved", nbytes)
            self.reserved[name] = nbytes
            ok.append(name)
        self._reply(m.rid, not refused, reserved=ok, refused=refused,
                    available=self.budget.available)

    def _on_cancel(self, sender: str, m: P.Cancel, at: float | None = None) -> None:
        for name in m.blocks:
            nbytes = self.reserved.pop(name, 0)
            if nbytes:
                self.budget.release("reserved", nbytes)
            if name in self.incoming:  # a pre-copy rolled back
                self._free(name, self.incoming)
        self._reply(m.rid, True)

    def _on_migrate(self, sender: str, m: P.Migrate, at: float | None = None) -> None:
        name, dst = m.block, m.to
        block = self.blocks.get(name)
        if block is None or dst == self.name:
            self._reply(m.rid, False, detail=f"{self.name} does not hold {name}" if block is None
                        else f"{name} is here already")
            return
        if m.since is not None and m.upto is not None:
            self._precopy_stage(m, block)
            return
        snapshot = (P.BlockSnapshot(m.rid, name, MappingProxyType(block.w), block.cache.k, block.cache.v)
                    if isinstance(block, HeadBlock) else P.BlockSnapshot(m.rid, name, MappingProxyType(block.w)))
        nbytes = self.send(dst, snapshot.wire(), at)
        log.debug("%s: sent %s to %s (%d B)", self.name, name, dst, nbytes)

    def _precopy_stage(self, m: P.Migrate, block: AnyBlock) -> None:
        """Send one pre-copy stage: cache positions [since, upto), with the weights at stage 0."""
        since, upto = m.since, m.upto
        assert since is not None and upto is not None
        w = MappingProxyType(block.w if since == 0 else {})
        if isinstance(block, HeadBlock):
            if block.cache.n < upto:
                self._reply(m.rid, False, detail=f"{m.block} holds {block.cache.n} positions, not {upto}")
                return
            stage = P.BlockSnapshot(m.rid, m.block, w, block.cache.k[since:upto], block.cache.v[since:upto], since)
        else:
            stage = P.BlockSnapshot(m.rid, m.block, w, since=since)
        self.send(m.to, stage.wire())

    def _on_precopy_stage(self, m: P.BlockSnapshot) -> None:
        """A pre-copy stage arrives: stage 0 installs the block among `incoming` (its
        reservation becomes the block); a later one appends the entries it carries."""
        name, since = m.block, m.since
        assert since is not None
        if since == 0:
            nbytes = self.reserved.pop(name, None)
            if nbytes is None:
                self._reply(m.rid, False, block=name, detail=f"{self.name} has no reservation for {name}")
                return
            self.budget.release("reserved", nbytes)
            cache = KVCache.from_state(m.k, m.v) if m.k is not None and m.v is not None else None
            try:
                installed = self._install(name, dict(m.w), cache, self.incoming)
            except (MemoryRefused, KeyError, ValueError) as e:
                self._reply(m.rid, False, block=name, detail=f"install failed: {e}")
                return
            self._reply(m.rid, True, block=name, bytes=installed)
            return
        block = self.incoming.get(name)
        if block is None or m.k is None or m.v is None or not isinstance(block, HeadBlock) or since > block.cache.n:
            self._reply(m.rid, False, block=name, detail=f"{self.name} has no pre-copy of {name} up to {since}")
            return
        grow = max(0, since + m.k.shape[0] - block.cache.n) * cost.cache_bytes_per_token(self.model)
        try:
            self.budget.charge("kv", grow)
        except MemoryRefused as e:
            self._reply(m.rid, False, block=name, detail=f"install failed: {e}")
            return
        block.cache.write(since, m.k, m.v)
        self._reply(m.rid, True, block=name, bytes=grow)

    def _on_block_snapshot(self, sender: str, m: P.BlockSnapshot, at: float | None = None) -> None:
        name = m.block
        if m.since is not None:
            self._on_precopy_stage(m)
            return
        nbytes = self.reserved.pop(name, None)
        if nbytes is None:
            self._reply(m.rid, False, block=name, detail=f"{self.name} has no reservation for {name}")
            return
        self.budget.release("reserved", nbytes)
        cache = KVCache.from_state(m.k, m.v) if m.k is not None and m.v is not None else None
        try:
            installed = self._install(name, dict(m.w), cache)
        except (MemoryRefused, KeyError, ValueError) as e:
            self._reply(m.rid, False, block=name, detail=f"install failed: {e}")
            return
        self._reply(m.rid, True, block=name, bytes=installed)

    def _on_abort(self, sender: str, m: P.Abort, at: float | None = None) -> None:
        self._admit(sender)
        self.floor = max(self.floor, m.seq)
        self.join.drop_through(self.floor)
        self.ffn_join.drop_through(self.floor)
        self._drop_early(self.floor)
        self._acks.add(self._spawn(self._abort_ack(m), sender))

    async def _abort_ack(self, m: P.Abort) -> None:
        # stale jobs finish (their results are dropped) before we answer; other answers to
        # aborts are not waited for (two of them would wait for each other)
        me = asyncio.current_task()
        try:
            pending = [t for t in self._work if t is not me and t not in self._acks]
            if pending:
                await asyncio.wait(pending)
            self._reply(m.rid, True)
        finally:
            if me is not None:
                self._acks.discard(me)

    def _on_telemetry(self, sender: str, m: P.Telemetry, at: float | None = None) -> None:
        """Report memory, compute and what our outgoing links showed since the last report;
        probe the links that carried nothing since then (and carry no probe yet), so the
        next report covers them."""
        since = self._tel_since
        # as of the request's emulated arrival: what the links delivered by then
        self._tel_since = now = asyncio.get_running_loop().time() if at is None else at
        links = {}
        for peer, link in self._outgoing().items():
            rate = 0.0 if link.down else link.observed_rate(since, now)
            links[peer] = {"rate": rate, "latency": link.observed_latency(since, now), "bytes": link.bytes_sent}
            if rate is None and m.probe_bytes and not link.in_flight:
                self.send(peer, P.Probe(bytes(m.probe_bytes)).wire(), at)
        f0, s0 = self._jobs_at_tel
        c = self.compute
        self._jobs_at_tel = (c.flops_done, c.busy_s)
        df, ds = c.flops_done - f0, c.busy_s - s0
        self._reply(m.rid, True, at=self._tel_since, memory=self.budget.counters(), kv=self.kv_bytes(),
                    weights=self.weight_bytes(), flops=df / ds if df > 0 and ds > 0 else c.rate,
                    links=links)

    def _on_probe(self, sender: str, m: P.Probe, at: float | None = None) -> None:
        """Measurement traffic: dropped (after telling `on_probe`, if set)."""
        if self.on_probe is not None:
            self.on_probe(sender, m, asyncio.get_running_loop().time())


def _quiet(fn: Callable[[], Any], loop: asyncio.AbstractEventLoop) -> Callable[[], Ahead]:
    """Arithmetic run early, with the loop time it was done (the loop's clock is a pure
    function of the monotonic clock: safe to read here); None instead of an exception (the
    job then computes it itself when its window opens, and any error surfaces there)."""
    def run() -> Ahead:
        try:
            with torch.inference_mode():
                value = fn()
        except Exception:
            value = None
        return Ahead(value, loop.time())
    return run


def _attend(heads: list[HeadBlock], x: torch.Tensor, pos: int) -> Callable[[], list[tuple[torch.Tensor, ...]]]:
    def run() -> list[tuple[torch.Tensor, ...]]:
        with torch.inference_mode():
            return [h.attend(x, pos) for h in heads]
    return run


def _ffn(block: FfnBlock, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            return block.forward(x)
    return run


def _partials(blocks: list[FfnBlock], x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The sum of ffn shards' partial outputs (a `_shards` job's arithmetic)."""
    def run() -> torch.Tensor:
        with torch.inference_mode():
            return sum_partials([b.partial(x) for b in blocks])
    return run


def _logits(src: SourceBlock, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            return src.logits(x[-1:])[0]
    return run


def _or_now(work: Callable[[], T]) -> Callable[[T | None], T]:
    """A job's commit when its arithmetic ran early: that result, or (it failed) work now."""
    return lambda value: work() if value is None else value


_EARLY_KINDS = frozenset((P.LAYER_INPUT, P.HEAD_OUTPUTS, P.FFN_INPUT, P.FFN_PARTIAL, P.LAST_HIDDEN))
EARLY_KINDS = _EARLY_KINDS  # the data frames whose content a transport may hand on early

# the one dispatch table of a device: every record kind the agent acts on, by its type
_HANDLERS: dict[type[P.Message], Callable[[DeviceAgent, str, Any, float | None], None]] = {
    P.Gen: DeviceAgent._on_gen,
    P.LastHidden: DeviceAgent._on_last_hidden,
    P.LayerInput: DeviceAgent._on_layer_input,
    P.HeadOutputs: DeviceAgent._on_head_outputs,
    P.FfnInput: DeviceAgent._on_ffn_input,
    P.FfnPartial: DeviceAgent._on_ffn_partial,
    P.Load: DeviceAgent._on_load,
    P.Route: DeviceAgent._on_route,
    P.Reserve: DeviceAgent._on_reserve,
    P.Cancel: DeviceAgent._on_cancel,
    P.Migrate: DeviceAgent._on_migrate,
    P.BlockSnapshot: DeviceAgent._on_block_snapshot,
    P.Abort: DeviceAgent._on_abort,
    P.Telemetry: DeviceAgent._on_telemetry,
    P.Probe: DeviceAgent._on_probe,
}
assert set(_HANDLERS) | {P.TABLE[k] for k in P.TO_CONTROLLER} == set(P.TABLE.values())
