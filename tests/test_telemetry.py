"""Measured telemetry: link rates estimated from observed transfers (probes on idle links)
notice a drop to a tenth within two decision epochs; compute and memory come from agents."""

from __future__ import annotations

from pathlib import Path

from testbed.experiments import run as experiment

from .conftest import Fixed, make_scenario, read_csv


def _belief(run_dir: Path, src: str, dst: str) -> list[tuple[int, float, float]]:
    """(token, configured Mbit/s, believed Mbit/s) at every links.csv row of src->dst."""
    return [(int(r["token"]), float(r["bandwidth_mbps"]), float(r["measured_mbps"]))
            for r in read_csv(run_dir / "links.csv") if r["src"] == src and r["dst"] == dst and r["measured_mbps"]]


class Dynamic(Fixed):
    dynamic = True  # re-plans (to the same placement): telemetry runs every epoch


def test_busy_link_drop_noticed_at_once(tmp_path: Path) -> None:
    interval = 4
    scen = make_scenario(n_devices=2, new_tokens=20, interval=interval, telemetry="measured",
                         events=[{"at_token": 8, "action": "set_link", "between": ["src", "a"], "bandwidth_mbps": 10}])
    prep = experiment.prepare(scen)
    assign = [1 if b.kind == "head" else 0 for b in prep.model.blocks]  # every layer crosses src<->a
    o = experiment.run(prep, Dynamic(assign), tmp_path / "r", clock="virtual")
    assert o.ok
    after = [(k, m) for k, bw, m in _belief(o.run_dir, "src", "a") if k >= 8 and bw == 10]
    assert after and all(abs(m - 10) / 10 < 0.02 for k, m in after if k >= 8 + 2 * interval)
    assert abs(after[-1][1] - 10) / 10 < 0.02


def test_idle_link_drop_noticed_within_two_epochs(tmp_path: Path) -> None:
    """b<->a carries no data; the devices probe it, so the estimate follows the drop."""
    interval = 2
    scen = make_scenario(n_devices=3, new_tokens=16, interval=interval, telemetry="measured",
                         events=[{"at_token": 6, "action": "set_link", "between": ["a", "b"], "bandwidth_mbps": 10}])
    prep = experiment.prepare(scen)
    assign = [1 if b.kind == "head" else 0 for b in prep.model.blocks]  # nothing on b
    o = experiment.run(prep, Dynamic(assign), tmp_path / "r", clock="virtual")
    assert o.ok
    rows = _belief(o.run_dir, "b", "a")
    before = [m for k, bw, m in rows if k < 6]
    assert before and abs(before[-1] - 100) / 100 < 0.02
    # epochs at 6, 8, 10, ...: by the second epoch after the drop the belief is the new rate
    noticed = [m for k, bw, m in rows if k >= 6 + 2 * interval]
    assert noticed and all(abs(m - 10) / 10 < 0.02 for m in noticed)


def test_measured_compute_and_memory_reach_the_planner(tmp_path: Path) -> None:
    """A slowdown shows in the measured compute rate; pressure shows in the capacity."""
    seen: list = []

    class Spy(Dynamic):
        def place(self, snap):  # type: ignore[no-untyped-def]
            seen.append(snap)
            return super().place(snap)

    scen = make_scenario(n_devices=2, new_tokens=12, interval=2, telemetry="measured",
                         events=[{"at_token": 4, "action": "set_compute", "device": "a", "factor": 0.25},
                                 {"at_token": 4, "action": "memory_pressure", "device": "a", "take_mib": 100}])
    prep = experiment.prepare(scen)
    assign = [1 if b.kind == "head" else 0 for b in prep.model.blocks]
    o = experiment.run(prep, Spy(assign), tmp_path / "r", clock="virtual")
    assert o.ok
    first, last = seen[1], seen[-1]
    assert abs(first.devices[1].flops - 20e9) / 20e9 < 1e-6
    assert abs(last.devices[1].flops - 5e9) / 5e9 < 1e-6
    assert first.devices[1].hard_capacity - last.devices[1].hard_capacity == 100 * 2**20
    events = {e["kind"] for e in read_csv(o.run_dir / "events.csv")}
    assert "replan" in events


def test_a_link_that_goes_down_is_routed_around_and_loses_nothing(tmp_path: Path) -> None:
    """src<->a goes down while every layer's heads sit on a: the source's own link alarm
    tells the controller at once that a is cut off; its heads are loaded again on b and
    their caches rebuilt; when the link returns, a rejoins (its stale copies are freed)
    and the heads move back. Frames held on the dead link arrive late as stale attempts
    and are dropped; every token equals the reference."""
    scen = make_scenario(n_devices=3, new_tokens=14, interval=4, telemetry="measured",
                         events=[{"at_token": 5, "action": "set_link", "between": ["src", "a"], "bandwidth_mbps": 0},
                                 {"at_token": 11, "action": "set_link", "between": ["src", "a"], "bandwidth_mbps": 100}])
    prep = experiment.prepare(scen)
    on_a = [1 if b.kind == "head" else 0 for b in prep.model.blocks]
    on_b = [2 if b.kind == "head" else 0 for b in prep.model.blocks]
    seen: list[float] = []

    class AvoidDownLinks(Dynamic):
        """Heads on a while src<->a works; on b while the controller believes it down."""

        def place(self, snap):  # type: ignore[no-untyped-def]
            seen.append(float(snap.rate[0, 1]))
            return Fixed(on_b if snap.rate[0, 1] == 0 or snap.rate[1, 0] == 0 else on_a).place(snap)

    o = experiment.run(prep, AvoidDownLinks(on_a), tmp_path / "r", clock="virtual")
    assert o.ok, o.status
    assert o.summary["correctness"]["tokens_match"]
    events = read_csv(o.run_dir / "events.csv")
    kinds = [(int(e["token"]), e["kind"]) for e in events]
    assert (5, "device_failed") in kinds and (5, "recovered") in kinds and (11, "device_rejoined") in kinds
    assert any(t == 11 and k == "migration" for t, k in kinds)  # the heads go back to a
    assert 0.0 in seen  # the planner saw the link down
    rows = read_csv(o.run_dir / "tokens.csv")
    assert len(rows) == 14 and float(rows[5]["latency_ms"]) < 100  # no long stall on the dead link
