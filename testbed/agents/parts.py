"""The interfaces between the controller and its parts, declared once.

The controller (controller.py) is composed of parts that each own their state and reach
the others only through what is declared here or passed to them:
- `Requests` (requests.py): messages to devices with request ids, and their answers;
- `Migrator` (migration.py): loading blocks, routing, the two-phase migration; it owns the
  placement in force and the routing version;
- `PreCopier` (precopy.py): pre-copy migration; it owns the moves in flight and switches
  routing through the `Migrator`;
- `Recovery` (recovery.py): devices lost, joining, cut off and back; it owns the lists of
  devices to recover and to revive, and asks the controller (a `Driver`) for snapshots,
  decisions, aborts and replays.
`Port`, `Recorder` and `RunHooks` are what the run's wiring (testbed/experiments/run.py) hands
the controller; `Stats` are the counters the parts add to for the summary.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..placement.problem import Placement, Snapshot


class Port(Protocol):
    """The controller's view of the transport: it runs on the source device."""

    source: str

    def send(self, dst: str, msg: dict[str, Any], at: float | None = None) -> None:
        """Send from the source, handed over at emulated time `at` (default now)."""

    def attach(self, handler: Callable[[str, dict[str, Any], float | None], None]) -> None:
        """`handler(sender, message, due)`: every message for the controller, with its
        emulated arrival at the source (None: now)."""

    async def settle(self, t: float) -> None:
        """Real clock: return once the messages due at the source by emulated time `t` have
        reached the controller, as far as the transport can tell (in process exactly; across
        sockets and processes after a little wall time for the hops)."""


class Recorder(Protocol):
    """Where a run's rows go (results.RunWriter)."""

    def token(self, row: dict[str, Any]) -> None: ...
    def event(self, t_s: float, token: int, kind: str, subject: str, detail: str) -> None: ...
    def placement(self, token: int, changes: Sequence[tuple[str, str]]) -> None: ...


class RunHooks(Protocol):
    """Instrumentation called at every decision epoch."""

    async def on_epoch(self, k: int) -> None: ...


Oracle = Callable[[int, int, "Placement | None"], Awaitable[Snapshot]]


class Progress(Protocol):
    """Where generation is: the token being produced, emulated time since the first token,
    positions every cache holds."""

    k: int

    def now(self) -> float: ...

    def seq_len(self) -> int: ...


class Driver(Progress, Protocol):
    """What recovery asks of the controller that drives generation."""

    def fault(self, why: str) -> None:
        """Stop the run: something failed beyond repair."""

    def interrupt(self, err: Exception) -> None:
        """The token attempt in flight fails with `err`."""

    def signal(self, reason: str) -> None:
        """Re-plan before the next token (`reason` is recorded)."""

    async def snapshot(self) -> Snapshot: ...

    async def plan(self, snap: Snapshot, reason: str) -> Placement:
        """Decide on `snap`; returns when the decision's modelled cost has passed."""

    async def abort(self) -> None:
        """Abort the attempt in flight on every device."""

    async def replay(self, n: int) -> None:
        """Run the first n positions of the token history through the pipeline again."""


@dataclass
class Stats:
    """Counters the controller and its parts keep for the summary."""

    migrations: int = 0
    migrated_bytes: int = 0
    failed_migrations: int = 0
    refused_migrations: int = 0
    replans: int = 0
    # real clock: re-plans during generation whose host time (wall / K) exceeded their
    # modelled cost by more than LATE_DECISION_SHARE of it (controller.py, a job's share), and
    # the emulated seconds they took beyond it (the timeline after them is that much later
    # than the virtual twin's); the deployment's decision is not counted: nothing runs while
    # it is made, so its lateness delays only the start
    late_decisions: int = 0
    late_decision_s: float = 0.0
    # real clock: the largest host time / modelled cost of a re-plan (the time scale at which
    # the slowest one would just have fitted)
    decision_scale: float = 0.0
    # real clock: reports (and telemetry rounds) that reached the controller only after it
    # had acted as of a later instant without them (`Port.settle` did not see them coming):
    # a decision may then differ from the virtual twin's
    missed_reports: int = 0
    emergencies: int = 0
    oom: int = 0
    stalls: int = 0
    decision_ms: list[float] = field(default_factory=list)
    recover_ms: list[float] = field(default_factory=list)
    logit_diff: float = 0.0
    mismatches: int = 0
    # one record per pre-copy migration switched (precopy.py); summary.json's migration_detail
    migration_log: list[dict[str, Any]] = field(default_factory=list)
