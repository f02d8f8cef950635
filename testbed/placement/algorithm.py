"""The `Algorithm` protocol: what every placement algorithm implements, built-in or plug-in.

Owns the contract between the controller and an algorithm (what a snapshot holds, what a
placement must satisfy, what raising `Infeasible` means) and `check_placement`, the check
the runner applies to what a plug-in returns. The types themselves live in problem.py; a
tutorial that writes a plug-in is docs/plugins.md.
"""

from __future__ import annotations

import operator
from typing import Protocol, runtime_checkable

from .problem import Infeasible, Placement, Snapshot, violations

__all__ = ["Algorithm", "Infeasible", "Placement", "Snapshot", "check_placement"]


@runtime_checkable
class Algorithm(Protocol):
    """A placement algorithm: `name`, `dynamic` and `place(snapshot) -> Placement`.

    `name` (str): how the algorithm appears in run directories, `meta.json` and tables.

    `dynamic` (bool): False, the controller calls `place` once, before the first token, and
    a run that later needs another placement (a refused cache append, a stalled token, a
    lost device) fails. True, it also calls `place` at every decision epoch (every
    `controller.interval_tokens` tokens) and at once on an emergency (those above, and link
    or memory alarms); the controller then migrates the blocks whose device changed.

    `place(snap)` receives a `Snapshot`, the controller's view at the decision:
    - `snap.spec`: the model (`spec.blocks` is every placeable block in canonical order:
      per layer its head groups `head.L.G`, then `proj.L`, then `ffn.L`);
    - `snap.devices`: a `DeviceState` per device (index = position), with `name`, `flops`
      (effective FLOP/s now), `capacity` (bytes the blocks may use on it), `host_blocks`,
      `alive` and `usable` (`host_blocks and alive`);
    - `snap.rate`, `snap.latency`, `snap.burst`: [V, V] numpy matrices of the directed link
      i -> j in bytes/s, seconds and bytes of burst credit (rate 0: the link is down);
      read-only for a plug-in;
    - `snap.source`: the index of the device that holds the embeddings and the LM head,
      where every token starts and ends;
    - `snap.seq_len`: positions every K/V cache holds now; `snap.interval`: tokens until the
      next decision; `snap.n_end = seq_len + interval` is the cache length that must fit;
    - `snap.current`: the placement in force (None at the first decision);
    - `snap.frame_extra`, `snap.context`: bytes the transport adds per frame, and free-form
      extras.
    With `telemetry: oracle` the view is the emulator's truth; with `measured` it is what
    the agents reported (rates measured from traffic, compute from their own jobs).

    It returns a `Placement(snap.spec, assign)`: `assign` holds one device index per block
    of `spec.blocks`, in that order. It must satisfy (`check_placement`): one entry per
    block; every entry an integer in `range(len(snap.devices))`; only usable devices hold
    blocks; and every device's blocks, with caches of `snap.n_end` positions
    (`problem.memory_need`), fit in its `capacity` (`problem.violations` is empty).

    When no placement fits, `place` raises `Infeasible`: the controller then asks once
    more with every device's capacity raised to its hard limit (`snap.hard()`), and if that
    fails too the run fails as infeasible. Any other exception, or a placement that breaks
    the rules above, fails the run of a plug-in with its traceback in `meta.json`.

    Useful helpers in problem.py: `estimate_token_latency(snap, p)` (seconds per token),
    `LatencyModel`, `memory_need`, `migration_delay`, `migration_cost`, `epoch_objective`; `model.cost` has
    `block_bytes(spec, block, n)` and the FLOPs of each block.
    """

    name: str
    dynamic: bool

    def place(self, snap: Snapshot) -> Placement: ...


def check_placement(snap: Snapshot, p: object) -> list[str]:
    """Why `p` is not a placement the controller may apply for `snap` (empty if it is):
    not a Placement, a different model, wrong length, entries that are not device indices,
    unusable devices, memory over capacity."""
    if not isinstance(p, Placement):
        return [f"place() returned {type(p).__name__}, not a Placement"]
    if p.spec != snap.spec:
        return [f"the placement is for model {p.spec.name!r}, not the snapshot's {snap.spec.name!r}"]
    try:
        assign = tuple(p.assign)
    except TypeError:
        return [f"assign is a {type(p.assign).__name__}, not a sequence of device indices"]
    blocks = snap.spec.blocks
    if len(assign) != len(blocks):
        return [f"{len(assign)} device indices for {len(blocks)} blocks"]
    out = []
    n = snap.n_devices
    for b, j in zip(blocks, assign, strict=True):
        try:
            if isinstance(j, bool):
                raise TypeError
            j = operator.index(j)
        except TypeError:
            out.append(f"{b.name} -> {j!r}: not an integer device index")
            continue
        if not 0 <= j < n:
            out.append(f"{b.name} -> {j}: no such device (0..{n - 1})")
    if out:
        return out
    return violations(snap, Placement(snap.spec, tuple(operator.index(j) for j in assign)))
