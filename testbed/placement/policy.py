"""The control policy (pure): when a placement is decided, what an emergency calls for,
how a decision is made and what it is predicted to gain.

Owns the rules that the controller (testbed/agents/controller.py) executes against the
emulated cluster and that the analytic simulation (testbed/analytic/simulate.py) executes against its
estimator, so that both follow one copy:
- the decision schedule: the first placement before token 0 (the prefill) covers the
  prompt and the first interval; an algorithm that re-plans (`dynamic`) decides again
  before every token k > 0 with k a multiple of the interval, and at once on a signal
  (memory pressure, a link alarm, a device joining);
- emergencies: a refused cache append (out of memory), a stalled token or a lost device
  call for an immediate re-plan; an algorithm that does not re-plan fails the run there,
  and an out-of-memory re-plan that moves nothing fails it too (the append would be
  refused again);
- a decision: the algorithm places on the view; when nothing fits under the soft memory
  limits it places once more with every device filled up to its hard limit; infeasible,
  a failing plug-in or a failing solver stop the run; the predicted gain is the epoch
  objective of staying put minus that of the new plan, on the view it was made on;
- a decision's cost: one modelled duration on the controller's device (`decision_cost_s`),
  the same on both clocks and in the analytic simulation: the new plan takes effect when
  it has passed (the host's own time for the decision is recorded, never counted);
- stall accounting: a token's latency includes its stall, the time spent before and
  between its attempts on decisions, migrations and recoveries (`TokenCharge`).
No asyncio, no IO, no clock: token numbers, views and outcomes come in as arguments; the
callers wait out the decisions' cost and measure (emulator) or predict (analytic) the stalls.
The `Algorithm` protocol that `decide` calls is beside it, in algorithm.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ..model.spec import Block
from .algorithm import Algorithm
from .plugins import PluginFailed
from .problem import Infeasible, LatencyModel, Placement, Snapshot, epoch_objective, migration_cost

__all__ = ["DECISION_COST", "Decision", "Policy", "Stop", "TokenCharge", "decision_cost_s"]

# What a decision costs on the controller's device, declared per algorithm as
# (seconds, seconds per block and device): a fixed part, and a part in proportion to the
# size of the assignment every built-in scans (blocks x devices). Declared, not counted: a
# plug-in's work cannot be counted, and a declared cost is the same on every host and
# clock. Fitted to the decision times of the paper's sweeps on this project's machine
# (results/paper/timing.csv: 30 to 52,224 block-device pairs; e.g. resource_aware 0.8 ms
# on small instances and 40 ms on 1088 blocks x 48 devices, the local search 22 ms and
# 305 ms, the exact solver about 20 ms on every instance it solves). A plug-in may declare
# its own as an attribute `decision_cost = (seconds, seconds_per_pair)`.
DECISION_COST: dict[str, tuple[float, float]] = {
    "static": (4e-4, 3e-6), "greedy": (4e-5, 1.5e-7), "round_robin": (4e-5, 1.5e-7), "equal_split": (5e-5, 1e-8),
    "layer_dp": (3e-4, 2.5e-8), "layer_dp_dynamic": (6e-4, 1.7e-7),
    "resource_aware": (8e-4, 7.5e-7), "resource_aware_ls": (2e-2, 5.5e-6), "optimal": (2e-2, 0.0),
}
DEFAULT_DECISION_COST = DECISION_COST["resource_aware"]  # a plug-in that declares none


def decision_cost_s(algorithm: Algorithm, snap: Snapshot) -> float:
    """The emulated seconds a decision of `algorithm` on `snap` takes on the controller's
    device (`DECISION_COST`)."""
    declared = getattr(algorithm, "decision_cost", None)
    if declared is None:
        declared = DECISION_COST.get(algorithm.name, DEFAULT_DECISION_COST)
    try:
        fixed, per_pair = (float(x) for x in declared)
    except (TypeError, ValueError):
        raise ValueError(f"{algorithm.name}: decision_cost must be (seconds, seconds per block and device), "
                         f"not {declared!r}") from None
    if not (0 <= fixed < math.inf and 0 <= per_pair < math.inf):
        raise ValueError(f"{algorithm.name}: decision_cost must be finite and not negative, not {declared!r}")
    return fixed + per_pair * len(snap.spec.blocks) * len(snap.devices)


class Stop(Exception):
    """The run cannot go on (recorded as `failed: <message>`). `event` names the row of
    events.csv that says so (None: nothing to record beyond the status), with `detail`;
    `record` is what meta.json keeps as `error` (a plug-in's traceback)."""

    def __init__(self, message: str, event: str | None = None, detail: str = "",
                 record: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message, self.event, self.detail, self.record = message, event, detail, record


@dataclass(frozen=True)
class Decision:
    """A placement decided on `snap` (the hard-limit view when the soft one had none)."""

    placement: Placement
    reason: str
    snap: Snapshot

    @cached_property
    def moves(self) -> list[tuple[Block, int, int]]:
        """(block, from, to) for every block the decision moves (none at the first one)."""
        cur = self.snap.current
        return cur.moves(self.placement) if cur is not None else []

    @cached_property
    def predicted_gain_s(self) -> float:
        """Epoch objective of staying put minus that of the new plan (nan at the first)."""
        cur = self.snap.current
        if cur is None:
            return math.nan
        lm = LatencyModel(self.snap)
        return epoch_objective(self.snap, cur, lm) - epoch_objective(self.snap, self.placement, lm)

    def migration_delay(self, world: Snapshot) -> float:
        """Seconds the moves cost the tokens over `world`'s links (the analytic stall): the
        transfer with stop-and-copy; with pre-copy its expected stall, interference and
        the tokens still run on the placement in force (`problem.migration_cost`)."""
        cur = self.snap.current
        if world.migration != "pre_copy" or cur is None or not self.moves:
            return migration_cost(world, self.moves)
        lm = LatencyModel(world)
        t0, t = lm.token_time(cur, world.n_mid), lm.token_time(self.placement, world.n_mid)
        return migration_cost(world, self.moves, t0 - t, t0)

    def describe(self, decision_ms: float, cost_s: float | None = None) -> str:
        """The detail of its `replan` row in events.csv: `decision_ms` the host's time,
        `cost_ms` the emulated one (`decision_cost_s`)."""
        moves = len(self.moves) if self.snap.current is not None else len(self.placement.spec.blocks)
        g = self.predicted_gain_s
        gain = f" predicted_gain_ms={g * 1e3:.3f}" if math.isfinite(g) else ""
        cost = f" cost_ms={cost_s * 1e3:.3f}" if cost_s is not None else ""
        return f"reason={self.reason} decision_ms={decision_ms:.3f}{cost} moves={moves}{gain}"


@dataclass
class TokenCharge:
    """What one token pays besides its own computation: stall seconds (decisions,
    migrations, recoveries before and between its attempts, included in its latency) and
    the migrations applied for it."""

    stall_s: float = 0.0
    migrations: int = 0
    migrated_bytes: int = 0

    def add(self, stall_s: float, migrations: int = 0, migrated_bytes: int = 0) -> None:
        self.stall_s += stall_s
        self.migrations += migrations
        self.migrated_bytes += migrated_bytes


@dataclass(frozen=True)
class Policy:
    """The rules for one run of `algorithm`: decisions every `interval` tokens, a prompt of
    `prompt` tokens (token 0 is its prefill; token k > 0 is the k-th decode step)."""

    algorithm: Algorithm
    interval: int
    prompt: int

    @property
    def name(self) -> str:
        return self.algorithm.name

    def cost_s(self, d: Decision) -> float:
        """The emulated duration of decision `d` (`decision_cost_s` on the view it was made
        on; a malformed declaration was refused by `decide`)."""
        return decision_cost_s(self.algorithm, d.snap)

    # ---------------------------------------------------------------- schedule

    def seq_len(self, k: int) -> int:
        """Positions every cache holds before token k."""
        return self.prompt + k - 1 if k > 0 else 0

    def horizon(self, k: int) -> tuple[int, int]:
        """(seq_len, interval) of the view for a decision before token k: the first one
        covers the prompt and the first interval."""
        if k == 0:
            return 0, self.prompt + self.interval
        return self.seq_len(k), self.interval

    def due(self, k: int, urgent: str | None = None) -> str | None:
        """The reason for a decision before token k > 0 (a signal `urgent` pending, or an
        epoch), or None. The first placement (k = 0) is not a re-plan: see `horizon`."""
        if k == 0 or not self.algorithm.dynamic:
            return None
        if urgent:
            return f"emergency:{urgent}"
        return "interval" if k % self.interval == 0 else None

    # ---------------------------------------------------------------- emergencies

    def emergency(self, kind: str, k: int, devices: Sequence[str] = (), detail: str = "") -> str:
        """The reason for the re-plan that an emergency before or during token k calls
        for: `oom` (a cache append refused on `devices[0]`), `stall` (`detail` says how
        long), `lost` (`devices` are gone). Stop if the algorithm does not re-plan."""
        if kind == "oom":
            if not self.algorithm.dynamic:
                raise Stop(f"out of memory on {devices[0]} at token {k} ({self.name} does not re-plan)")
            return f"emergency:oom@{devices[0]}"
        if kind == "lost":
            if not self.algorithm.dynamic:
                raise Stop(f"{', '.join(devices)} failed and {self.name} does not re-plan")
            return f"emergency:lost@{','.join(devices)}"
        if kind == "stall":
            if not self.algorithm.dynamic:
                raise Stop(f"{detail} and {self.name} does not re-plan")
            return "emergency:stall"
        raise ValueError(f"unknown emergency {kind!r}")

    def repaired(self, kind: str, k: int, moved: int, devices: Sequence[str] = ()) -> None:
        """After an emergency re-plan that applied `moved` migrations: an out-of-memory one
        that moved nothing leaves the refused append refused, so the run stops."""
        if kind == "oom" and moved == 0:
            raise Stop(f"out of memory on {devices[0]} at token {k} and re-planning moved nothing")

    # ---------------------------------------------------------------- decisions

    def decide(self, snap: Snapshot, reason: str) -> Decision:
        """Place on `snap`, falling back to the hard memory limits; Stop when no placement
        fits at all or the algorithm fails (a plug-in's error, a solver refusing)."""
        alg = self.algorithm
        try:
            try:
                new = alg.place(snap)
            except Infeasible:
                # no placement keeps every device under its soft limit: use the headroom
                snap = snap.hard()
                new = alg.place(snap)
                reason += ",hard_limits"
        except Infeasible as e:
            raise Stop(f"infeasible: {e}", "infeasible", str(e)) from None
        except PluginFailed as e:  # a plug-in raised or answered an invalid placement
            raise Stop(str(e), "algorithm_error", str(e), e.record()) from None
        except (ValueError, RuntimeError) as e:  # e.g. an exact solver refusing or timing out
            raise Stop(f"{alg.name} failed: {e}", "algorithm_error", str(e)) from None
        try:
            decision_cost_s(alg, snap)
        except ValueError as e:  # a plug-in's own declaration of its cost
            raise Stop(str(e), "algorithm_error", str(e)) from None
        return Decision(new, reason, snap)
