"""Pre-copy migration end to end (virtual clock): blocks move while generation goes on, and
whatever fails at whatever stage (a refused reservation, a destination out of memory, a
stage lost on the wire, a dead link, a lost device, a re-plan that changes its mind), no
cache entry is lost or duplicated and the tokens equal the reference."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from testbed.agents.controller import Controller
from testbed.experiments import run as experiment
from testbed.harness.cluster import Cluster
from testbed.model import cost
from testbed.model.blocks import HeadBlock
from testbed.placement.problem import Placement, Snapshot
from testbed.scenario import parse

from .conftest import Scripted, fresh_dir, read_csv, read_json, scenario_dict

PROMPT, NEW, INTERVAL = 3, 20, 4


class ScriptedAlive(Scripted):
    """Scripted plans; a block planned on a device that cannot host (lost) goes to the source."""

    name = "scripted_alive"

    def place(self, snap: Snapshot) -> Placement:
        p = super().place(snap)
        return Placement(snap.spec, tuple(j if snap.devices[j].usable else snap.source for j in p.assign))


def scenario(events: list[dict[str, Any]], memory: dict[str, float], mechanism: str = "pre_copy") -> Any:
    # slow devices and links: a token takes tens of ms, a head's stage 0 several tokens
    d = scenario_dict(n_devices=4, new_tokens=NEW, prompt=PROMPT, interval=INTERVAL, telemetry="oracle",
                      bandwidth_mbps=0.5, latency_ms=0.5, events=events)
    d["controller"]["migration"] = mechanism
    for dev in d["devices"]:
        dev["compute_gflops"] = 0.005
        if dev["name"] in memory:
            dev["memory_mib"] = memory[dev["name"]]
    return parse(d, "<test>")


def check_final_state(cluster: Cluster, ctl: Controller, n: int) -> None:
    """Every block on exactly one live device, where routing says; every head's cache holds
    exactly the n positions generated; nothing reserved or half-copied anywhere."""
    spec = cluster.model
    alive = set(ctl.beliefs.alive_names())
    held: dict[str, str] = {}
    for name, agent in cluster.agents.items():
        if name not in alive:
            continue
        assert not agent.incoming and not agent.reserved, (name, agent.incoming, agent.reserved)
        for block_name, block in agent.blocks.items():
            assert block_name not in held, f"{block_name} on {held.get(block_name)} and {name}"
            held[block_name] = name
            if isinstance(block, HeadBlock):
                assert block.cache.n == n, (block_name, block.cache.n, n)
        b = agent.budget.by_category
        assert b["kv"] == agent.kv_bytes() and b["weights"] == agent.weight_bytes() and b["reserved"] == 0
    assert ctl.placement is not None
    assert held == ctl.placement.names(cluster.names)
    assert sum(cluster.agents[d].kv_bytes() for d in alive) == cost.model_cache_bytes(spec, n)
    assert not ctl.precopy.moves


@settings(max_examples=int(os.environ.get("TESTBED_FUZZ_EXAMPLES", "30")), deadline=None, report_multiple_bugs=False, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_pre_copies_with_faults_lose_nothing(data: st.DataObject, tmp_path: Path) -> None:
    memory = dict(zip(("a", "b", "c"), data.draw(st.lists(st.sampled_from([0.06, 0.3, 8.0]), min_size=3, max_size=3),
                                                  label="MiB"), strict=True))
    events: list[dict[str, Any]] = []
    fault = data.draw(st.sampled_from(["none", "fail_device", "cut_off", "slow_link"]), label="fault")
    if fault != "none":
        at = data.draw(st.integers(2, NEW - 2), label="fault token")
        x, y = data.draw(st.permutations(["a", "b", "c"]), label="devices")[:2]
        if fault == "fail_device":
            events.append({"at_token": at, "action": "fail_device", "device": x})
        elif fault == "cut_off":  # x's link to the source dies (x is cut off), and comes back
            events.append({"at_token": at, "action": "set_link", "between": ["src", x], "bandwidth_mbps": 0})
            if at + 3 < NEW:
                events.append({"at_token": at + 3, "action": "set_link", "between": ["src", x], "bandwidth_mbps": 0.5})
        else:  # a link's rate collapses: stages on it time out
            events.append({"at_token": at, "action": "set_link", "between": [x, y], "bandwidth_mbps": 0.05})
    scen = scenario(events, memory)
    prep = experiment.prepare(scen)
    nb = len(prep.model.blocks)
    # each plan is answered at two decisions in a row, so that most moves can finish
    drawn = [tuple(data.draw(st.lists(st.integers(0, 3), min_size=nb, max_size=nb))) for _ in range(NEW // INTERVAL // 2 + 2)]
    plans = [(0,) * nb] + [p for p in drawn for _ in range(2)]
    # stage frames lost once on the wire: (block, the index of its stage frame to lose)
    lose = data.draw(st.dictionaries(st.sampled_from([b.name for b in prep.model.blocks]), st.integers(0, 2),
                                     max_size=3), label="lost stages")
    seen: dict[str, int] = {}
    dropped: list[str] = []

    def setup(cluster: Cluster) -> None:
        def drop(src: str, dst: str, msg: dict[str, Any]) -> bool:
            if msg["t"] != "block" or "since" not in msg or msg["block"] not in lose:
                return False
            i = seen[msg["block"]] = seen.get(msg["block"], -1) + 1
            if i == lose[msg["block"]]:
                dropped.append(msg["block"])
                return True
            return False

        cluster.net.drop = drop

    finals: list[tuple[Cluster, Controller]] = []
    o = experiment.run(prep, ScriptedAlive(plans), fresh_dir(tmp_path) / "run", clock="virtual", setup=setup,
                       on_finish=lambda c, k: finals.append((c, k)))
    tokens = read_csv(o.run_dir / "tokens.csv")
    assert all(t["token_id"] == t["ref_token_id"] for t in tokens)  # every token produced is the reference's
    if not o.ok:
        # random plans can leave a tiny device holding too much after an out-of-memory
        # re-plan the script answers with nothing movable, keep blocks across a collapsed
        # link, or reload a lost device's blocks where they do not fit: the policy's stops,
        # whatever the mechanism
        assert ("out of memory" in o.status and "moved nothing" in o.status) or "times in a row" in o.status \
            or "infeasible" in o.status, o.status
        event(f"stopped: {o.status}")
        return
    summary = read_json(o.run_dir / "summary.json")
    assert summary["correctness"]["tokens_match"] and summary["correctness"]["max_abs_logit_diff"] <= 1e-4
    events_rows = read_csv(o.run_dir / "events.csv")
    kinds = [e["kind"] for e in events_rows]
    assert summary["failed_migrations"] == kinds.count("migration_failed")
    assert summary["refused_migrations"] == kinds.count("migration_refused")
    pre = [e for e in events_rows if e["kind"] == "migration" and "mechanism=pre_copy" in e["detail"]]
    detail = summary.get("migration_detail", [])
    assert [m["block"] for m in detail] == [e["subject"] for e in pre]
    for m in detail:
        assert m["stages"] == len(m["stage_bytes"]) >= 1 and sum(m["stage_bytes"]) == m["bytes"]
        assert m["first_token"] <= m["switch_token"]
    check_final_state(*finals[0], n=PROMPT + NEW - 1)
    event(f"fault: {fault}")
    event(f"migrations>0: {summary['migrations'] > 0}")
    event(f"failed>0: {summary['failed_migrations'] > 0}")
    event(f"refused>0: {summary['refused_migrations'] > 0}")
    event(f"stage lost: {bool(dropped)}")


def test_a_pre_copy_serves_from_the_source_until_the_switch(tmp_path: Path) -> None:
    """Deterministic: one head moves by pre-copy over a slow link; its stages are marked in
    events.csv, the tokens generated meanwhile are served by the source (none stalls), the
    switch pauses for the last delta only, and the copy holds every position."""
    scen = scenario([], {})
    prep = experiment.prepare(scen)
    spec = prep.model
    nb = len(spec.blocks)
    moved = spec.blocks[0].name  # head.0.0
    second = tuple(1 if b.name == moved else 0 for b in spec.blocks)
    finals: list[tuple[Cluster, Controller]] = []
    o = experiment.run(prep, Scripted([(0,) * nb, second]), tmp_path / "r", clock="virtual",
                       on_finish=lambda c, k: finals.append((c, k)))
    assert o.ok, o.status
    rows = read_csv(o.run_dir / "events.csv")
    stages = [e for e in rows if e["kind"] == "migration_stage"]
    assert len(stages) >= 2 and all(e["subject"] == moved for e in stages)
    assert "stage=0 positions=0-" in stages[0]["detail"]
    (mig,) = [e for e in rows if e["kind"] == "migration"]
    switch = int(mig["token"])
    tokens = read_csv(o.run_dir / "tokens.csv")
    started = int(stages[0]["token"])
    assert switch > started  # the copy spanned tokens: generation went on meanwhile
    assert all(float(t["stall_ms"]) == 0 for t in tokens if started < int(t["token"]) < switch)
    summary = read_json(o.run_dir / "summary.json")
    (detail,) = summary["migration_detail"]
    assert detail["block"] == moved and detail["switch_token"] == switch
    # the pause is the last delta and the routing round: far less than the whole transfer
    assert detail["stall_ms"] * 5 < detail["stage_ms"][0]
    cluster, ctl = finals[0]
    assert moved in cluster.agents["a"].blocks and moved not in cluster.agents["src"].blocks
    check_final_state(cluster, ctl, n=PROMPT + NEW - 1)
    assert summary["correctness"]["tokens_match"]
