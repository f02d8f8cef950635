"""Pre-copy migration's rules (pure): which stage comes next, when the block pauses, and
what the algorithms should expect it to cost.

A pre-copy moves a block in stages while its source keeps serving: stage 0 carries the
weights and the cache as of now (positions [0, n0)); each later stage carries the entries
appended since the previous one ([n_i, n_{i+1})). Stages are issued at token boundaries,
when every cache holds exactly the positions of the tokens produced so far. The block
pauses (the final stage, at a token boundary, while no attempt is in flight) when what is
left is small (`small_rows` positions or fewer), when a stage left no less than the one
before it (the link does not keep up with generation: more stages would not converge), or
after `max_stages` stages; then the last delta crosses and routing switches.

`Stage` is one step of that plan; `next_stage` is the rule; the controller's shell
(testbed/agents/precopy.py) executes it, and the cost model (`problem.migration_cost`)
prices it with the same constants.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PreCopyRule:
    small_rows: int = 2  # positions per cache left that the block pauses for
    max_stages: int = 4  # stages before the final one, the first included


RULE = PreCopyRule()


@dataclass(frozen=True)
class Stage:
    """Send positions [since, upto) of the block's cache (and its weights when `since` is
    0); `final`: the block pauses for it and routing switches after it."""

    since: int
    upto: int
    final: bool

    @property
    def rows(self) -> int:
        return self.upto - self.since


def first_stage(n: int) -> Stage:
    """Stage 0: the weights and the cache as of now (n positions)."""
    return Stage(0, n, False)


def next_stage(sent: int, n: int, stages: int, last_rows: int, rule: PreCopyRule = RULE) -> Stage:
    """After `stages` stages have crossed, the last of them carrying `last_rows` positions
    and all of them the positions [0, sent), with n positions held now: the next stage.
    `last_rows` of stage 0 is its n0 (the whole cache), so a second stage always follows a
    first one that carried more than `small_rows`."""
    if n < sent:
        raise ValueError(f"the cache holds {n} positions but {sent} were sent")
    left = n - sent
    final = left <= rule.small_rows or stages >= rule.max_stages or (stages > 1 and left >= last_rows)
    return Stage(sent, n, final)
