"""Pre-copy's pure parts: the stage rule and what the algorithms expect it to cost."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.model import cost
from testbed.placement.precopy import RULE, PreCopyRule, first_stage, next_stage
from testbed.placement.problem import (
    Placement,
    epoch_objective,
    inference_links,
    migration_cost,
    migration_delay,
)
from testbed.placement.registry import get_algorithm

from .test_placement import snapshot


def test_the_rule_pauses_when_little_is_left_or_it_does_not_converge_or_after_max_stages() -> None:
    assert first_stage(40) == first_stage(40).__class__(0, 40, False)
    assert next_stage(40, 41, 1, 40).final  # one position left
    assert not next_stage(40, 47, 1, 40).final  # seven left after stage 0: another stage
    assert next_stage(40, 47, 2, 7).final  # seven left after a stage of seven: not converging
    assert not next_stage(40, 47, 2, 8).final
    assert next_stage(40, 47, RULE.max_stages, 100).final  # bounded
    with pytest.raises(ValueError):
        next_stage(41, 40, 1, 41)


@settings(max_examples=200, deadline=None)
@given(n0=st.integers(0, 2000), growth=st.lists(st.integers(0, 50), min_size=1, max_size=20),
       small=st.integers(0, 8), most=st.integers(1, 8))
def test_stages_cover_every_position_once_and_end(n0: int, growth: list[int], small: int, most: int) -> None:
    """Stages are contiguous from 0 to the positions held at the switch, and the rule ends
    within max_stages stages whatever the cache grows by meanwhile."""
    rule = PreCopyRule(small, most)
    st0 = first_stage(n0)
    covered, sent, n, stages, last = [(st0.since, st0.upto)], st0.upto, n0, 1, st0.rows
    for g in growth:
        n += g
        s = next_stage(sent, n, stages, last, rule)
        covered.append((s.since, s.upto))
        if s.final:
            break
        sent, stages, last = s.upto, stages + 1, s.rows
    else:
        return  # growth ran out before the rule ended: nothing to check beyond coverage
    assert covered[0][0] == 0 and all(a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False))
    assert covered[-1][1] == n
    assert stages <= most


def test_stop_and_copy_costs_its_transfer_and_pre_copy_its_stall_and_interference() -> None:
    snap = snapshot(rate_mbps=8, lat_ms=5)
    s = snap.spec
    head = s.blocks[0]
    moves = [(head, 1, 2)]
    assert migration_cost(snap, moves) == migration_delay(snap, moves)
    pre = snap.with_(migration="pre_copy")
    # nothing in force: no token crosses the link; the stall is the last delta and the switch
    delta = RULE.small_rows * cost.cache_bytes_per_token(s) + cost.FRAME_OVERHEAD
    stall = delta / 1e6 + 5e-3 + 2 * 5e-3 + 2 * 5e-3
    assert migration_cost(pre, moves) == pytest.approx(stall)
    assert migration_cost(pre, moves) < migration_delay(snap, moves) / 4
    # a placement in force whose tokens cross 1 -> 2: one token waits behind the transfer
    current = Placement(s, tuple(1 if b.kind == "head" else 2 for b in s.blocks))
    assert (1, 2) in inference_links(current, 0)
    crossing = pre.with_(current=current)
    assert migration_cost(crossing, moves) == pytest.approx(stall + migration_delay(snap, moves))
    # the tokens that still run on the old placement forgo what the move saves
    lagging = migration_cost(pre, moves, saved_per_token=1e-3, token_s=10.0)
    assert lagging == pytest.approx(stall + 1e-3)  # one token: the switch waits for a boundary
    t = migration_delay(snap, moves)
    assert migration_cost(pre, moves, 1e-3, t / 3) == pytest.approx(stall + 3e-3)


def test_a_pre_copy_controller_moves_sooner_when_it_pays() -> None:
    """resource_aware after a link's rate falls tenfold (bandwidth_drop's situation): with
    stop-and-copy no head's saving over the interval pays for its transfer on 5 Mbit/s
    links; with pre-copy's cost (what each move adds to the batch's), a head moves."""
    ra = get_algorithm("resource_aware")
    base = snapshot(flops=[0.5e9, 1e9, 1e9, 0.5e9], rate_mbps=5, lat_ms=0.1, seq_len=40, interval=8)
    start = ra.place(base)
    rate = base.rate.copy()
    rate[0, 1] = rate[1, 0] = rate[0, 1] / 10
    slow = base.with_(current=start, rate=rate)
    assert start.moves(ra.place(slow)) == []
    pre = slow.with_(migration="pre_copy")
    new = ra.place(pre)
    assert len(start.moves(new)) >= 1
    # the objective prices the same plan's moves lower under pre-copy (stall, interference
    # and lag instead of the transfer), and identically when nothing moves
    assert epoch_objective(pre, new) < epoch_objective(slow, new)
    assert epoch_objective(pre, start) == epoch_objective(slow, start)
