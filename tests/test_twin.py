"""The judges of real-clock runs, on constructed runs just inside and just outside each of
their limits: `twin.compare` (a real-clock run against its virtual twin) and
`verdict.fidelity` (a run's own distortion verdict). Pure: no run is started."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from testbed.experiments import twin
from testbed.experiments.twin import OVERRUN_LIMIT as DISTORTED
from testbed.experiments.verdict import fidelity
from testbed.results.write import summarize

ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-3  # "just": a tenth of a percentage point either side of a limit


def summary(mean: float = 10.0, p95: float = 20.0, migrations: int = 10, overrun: float = 0.0,
            tokens_match: bool = True, status: str = "completed",
            migration_stall_ms: float | None = 90.0) -> dict[str, Any]:
    """The fields of a summary.json that `twin.compare` reads."""
    out = {"status": status, "latency_ms": {"mean": mean, "p95": p95}, "migrations": migrations,
           "overrun_fraction": overrun, "late_delivery_fraction": 0.0,
           "correctness": {"tokens_match": tokens_match}, "time_scale": 8.0, "wall_s": 3.0}
    if migration_stall_ms is not None:
        out["migration_stall_ms"] = migration_stall_ms
    return out


TWIN = summary()


def test_the_twin_itself_is_faithful() -> None:
    c = twin.compare(summary(), TWIN)
    assert c["faithful"] and c["problems"] == []
    assert c["mean_error"] == 0.0 and c["p95_error"] == 0.0


@pytest.mark.parametrize("sign", [+1, -1], ids=["slower", "faster"])
@pytest.mark.parametrize(("field", "tol", "says"), [("mean", twin.MEAN_TOLERANCE, "mean latency"),
                                                    ("p95", twin.P95_TOLERANCE, "p95 latency")])
def test_latency_just_inside_and_just_outside(field: str, tol: float, says: str, sign: int) -> None:
    base = TWIN["latency_ms"][field]
    inside = twin.compare(summary(**{field: base * (1 + sign * (tol - EPS))}), TWIN)
    outside = twin.compare(summary(**{field: base * (1 + sign * (tol + EPS))}), TWIN)
    assert inside["faithful"], inside["problems"]
    assert not outside["faithful"]
    assert len(outside["problems"]) == 1 and outside["problems"][0].startswith(says), outside["problems"]
    assert f"{sign * (tol + EPS):+.1%}" in outside["problems"][0]  # it says by how much


def test_each_latency_is_judged_on_its_own() -> None:
    """A mean within 5 % does not excuse a p95 outside 10 %, nor the reverse."""
    c = twin.compare(summary(mean=10.0, p95=20.0 * 1.2), TWIN)
    assert [p.split()[0] for p in c["problems"]] == ["p95"]
    c = twin.compare(summary(mean=10.0 * 1.07, p95=20.0), TWIN)
    assert [p.split()[0] for p in c["problems"]] == ["mean"]


@pytest.mark.parametrize("twin_migrations", [10, 40])
def test_migrations_just_inside_and_just_outside(twin_migrations: int) -> None:
    """Migrations are counts: the largest difference within the tolerance passes, one more fails."""
    ref = summary(migrations=twin_migrations)
    allowed = int(twin.MIGRATION_TOLERANCE * twin_migrations)
    for m in (twin_migrations - allowed, twin_migrations + allowed):
        assert twin.compare(summary(migrations=m), ref)["faithful"], m
    for m in (twin_migrations - allowed - 1, twin_migrations + allowed + 1):
        c = twin.compare(summary(migrations=m), ref)
        assert c["problems"] == [f"{m} migrations against the twin's {twin_migrations}"]


@pytest.mark.parametrize("sign", [+1, -1], ids=["longer", "shorter"])
def test_migration_stall_just_inside_and_just_outside(sign: int) -> None:
    tol = twin.STALL_TOLERANCE
    assert twin.compare(summary(migration_stall_ms=90.0 * (1 + sign * (tol - EPS))), TWIN)["faithful"]
    c = twin.compare(summary(migration_stall_ms=90.0 * (1 + sign * (tol + EPS))), TWIN)
    assert c["problems"] == [f"migration stall {90.0 * (1 + sign * (tol + EPS)):.1f} ms against the twin's 90.0 ms"]


def test_no_migration_stall_in_the_twin_allows_none() -> None:
    """Without migrations nothing stalled for them: any stall of that kind is a difference.
    A summary written before the field existed is not judged on it."""
    none = summary(migrations=0, migration_stall_ms=0.0)
    assert twin.compare(none, none)["faithful"]
    assert not twin.compare(summary(migrations=0, migration_stall_ms=0.5), none)["faithful"]
    assert twin.compare(summary(migration_stall_ms=None), TWIN)["faithful"]


def test_no_migrations_in_the_twin_allows_none() -> None:
    assert twin.compare(summary(migrations=0), summary(migrations=0))["faithful"]
    assert not twin.compare(summary(migrations=1), summary(migrations=0))["faithful"]


def test_overruns_just_inside_and_just_outside() -> None:
    lim = twin.OVERRUN_LIMIT
    assert twin.compare(summary(overrun=lim), TWIN)["faithful"]
    c = twin.compare(summary(overrun=lim + EPS / 10), TWIN)
    assert c["problems"] == [f"{lim + EPS / 10:.1%} of jobs overran"]


def test_tokens_and_status() -> None:
    """Every token equal to the reference's, and a completed run: no latency makes up for either."""
    c = twin.compare(summary(tokens_match=False), TWIN)
    assert c["problems"] == ["tokens differ from the reference"] and not c["tokens_match"]
    c = twin.compare(summary(status="failed"), TWIN)
    assert c["problems"] == ["status failed"]


def test_a_twin_without_latency_is_not_a_yardstick() -> None:
    """A twin whose mean is 0 (nothing measured) cannot vouch for a real run that took time."""
    c = twin.compare(summary(), summary(mean=0.0))
    assert not c["faithful"] and c["mean_error"] == float("inf")


def test_the_documented_tolerances_are_the_code_s() -> None:
    """docs/fidelity.md and the module's own docstring state the limits `compare` applies."""
    want = (f"mean per-token latency within {twin.MEAN_TOLERANCE:.0%}, p95 within {twin.P95_TOLERANCE:.0%}, "
            f"migrations within {twin.MIGRATION_TOLERANCE:.0%}, the stall of the tokens that migrated within "
            f"{twin.STALL_TOLERANCE:.0%}, at most {twin.OVERRUN_LIMIT:.0%} of jobs")
    text = re.sub(r"\s+", " ", (ROOT / "docs" / "fidelity.md").read_text())
    assert want.replace("%", " %") in text
    doc = re.sub(r"\s+", " ", twin.__doc__ or "")
    assert f"mean within {twin.MEAN_TOLERANCE:.0%}".replace("%", " %") in doc
    assert f"migrations within {twin.MIGRATION_TOLERANCE:.0%}".replace("%", " %") in doc
    assert f"the stall of the tokens that migrated within {twin.STALL_TOLERANCE:.0%}".replace("%", " %") in doc


# ---------------------------------------------------------------------------- fidelity


def test_virtual_runs_are_never_distorted() -> None:
    v = fidelity("virtual", 1.0, overrun=0.5, late=0.5, share=9.0)
    assert v["distorted"] is False and "virtual clock" in v["reason"]


def test_distortion_just_inside_and_just_outside() -> None:
    """More than DISTORTED of jobs overran, or one report missed a decision: the run says
    its results are distorted and suggests a scale; at the limit, and with every control
    frame delivered late (each is acted on as of its due time), it does not."""
    at = fidelity("real", 8.0, overrun=DISTORTED, late=1.0, share=0.5)
    assert at["distorted"] is False and "suggested_time_scale" not in at
    assert at["needed_time_scale"] == 4.0
    over = fidelity("real", 8.0, overrun=DISTORTED + EPS / 10, late=0.0, share=0.5)
    assert over["distorted"] is True and "host's speed entered the results" in over["reason"]
    missed = fidelity("real", 8.0, overrun=0.0, late=0.0, share=0.5, missed=1)
    assert missed["distorted"] is True and "1 report(s) reached the controller after" in missed["reason"]


def test_replans_later_than_their_cost_distort_a_run_when_they_add_up_to_its_limit() -> None:
    """Re-plans whose host time did not fit their modelled cost shift everything after them;
    when together more than DISTORTED of the run's emulated time, the run says so and
    suggests a scale that fits the slowest one (1.5 x its host time over its cost)."""
    ok = fidelity("real", 8.0, 0.0, 0.0, share=0.5, late_decision_s=DISTORTED * 2.0, emulated_s=2.0,
                  decision_scale=30.0)
    assert ok["distorted"] is False
    bad = fidelity("real", 8.0, 0.0, 0.0, share=0.5, late_decision_s=DISTORTED * 2.0 + 1e-6, emulated_s=2.0,
                   decision_scale=30.0)
    assert bad["distorted"] is True and bad["suggested_time_scale"] == 45
    assert "re-plans took 20.0 ms of emulated time beyond their modelled cost" in bad["reason"], bad["reason"]
    # no emulated time known (a run that failed before its first token): not judged on this
    assert fidelity("real", 8.0, 0.0, 0.0, share=0.5, late_decision_s=1.0)["distorted"] is False


def test_few_overruns_that_ended_far_past_their_finish_distort_a_run() -> None:
    """A pause of the host (a garbage collection, say) holds up only the jobs in flight: a
    small share of the jobs, each late by the whole pause. When the overruns ended more
    than DISTORTED of the run's emulated time past their finish in all, the run says so."""
    ok = fidelity("real", 8.0, 0.006, 0.0, share=0.5, emulated_s=0.4, overrun_s=DISTORTED * 0.4)
    assert ok["distorted"] is False and "4.0 ms past their emulated finish" in ok["reason"], ok["reason"]
    bad = fidelity("real", 8.0, 0.006, 0.0, share=0.5, emulated_s=0.4, overrun_s=DISTORTED * 0.4 + 1e-6)
    assert bad["distorted"] is True and bad["suggested_time_scale"] == 16
    assert "(4.0 ms of emulated time past their finish in all, more than 1%" in bad["reason"], bad["reason"]
    # no emulated time known (a run that failed before its first token): not judged on this
    assert fidelity("real", 8.0, 0.0, 0.0, share=0.5, overrun_s=1.0)["distorted"] is False


def test_the_suggested_scale_is_at_least_twice_the_one_used() -> None:
    # needed 8 x 0.5 = 4: 1.5 x 4 = 6 < 2 x 8 = 16
    assert fidelity("real", 8.0, 0.05, 0.0, share=0.5)["suggested_time_scale"] == 16
    # needed 8 x 3 = 24: 1.5 x 24 = 36 > 16
    v = fidelity("real", 8.0, 0.05, 0.0, share=3.0)
    assert v["needed_time_scale"] == 24.0 and v["suggested_time_scale"] == 36
    assert "--time-scale 36" in v["reason"]


def test_a_loaded_host_is_named_in_the_verdict() -> None:
    host = {"wall_s": 10.0, "other_cpu_s": 6.0, "cpus": 2}
    v = fidelity("real", 8.0, 0.05, 0.0, share=0.5, host=host)
    assert "other processes took" in v["reason"]
    assert "other processes" not in fidelity("real", 8.0, 0.05, 0.0, share=0.5,
                                             host={"wall_s": 10.0, "other_cpu_s": 0.5, "cpus": 2})["reason"]


def test_the_summary_counts_the_stall_of_tokens_that_migrated() -> None:
    """`migration_stall_ms`: the stall of the tokens that moved blocks, not that of a
    re-plan that moved nothing or of a recovery without moves."""
    rows = [{"token": k, "phase": "prefill" if k == 0 else "decode", "latency_ms": 5.0, "predicted_ms": 5.0,
             "stall_ms": stall, "migrations": moved, "migrated_bytes": 100 * moved}
            for k, (stall, moved) in enumerate([(0.0, 0), (0.4, 0), (30.0, 3), (2.0, 0), (12.5, 1)])]
    s = summarize(rows)
    assert s["stall_ms"] == 44.9 and s["migration_stall_ms"] == 42.5 and s["migrations"] == 4


# ---------------------------------------------------------------------------- decisions

def rows(moves_to: str = "pi-b", stall: float = 90.0, reason: str = "emergency:link_change@gateway->pi-a",
         at: int = 25) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """events.csv and tokens.csv rows of a run that re-plans before token 16 (nothing moves)
    and at token `at` (two heads move to `moves_to`, with `stall` ms on that token)."""
    events = [{"token": 0, "kind": "replan", "subject": "ra", "detail": "reason=initial decision_ms=9.1 moves=40"},
              {"token": 16, "kind": "replan", "subject": "ra",
               "detail": "reason=interval decision_ms=1.0 cost_ms=1.048 moves=0 predicted_gain_ms=0.000"},
              {"token": at, "kind": "replan", "subject": "ra", "detail": f"reason={reason} decision_ms=3.7 moves=2"}]
    events += [{"token": at, "kind": "migration", "subject": f"head.0.{g}", "detail": f"from=pi-a to={moves_to} ms=1"}
               for g in (4, 3)]
    tokens = [{"token": k, "stall_ms": stall if k == at else (1.048 if k == 16 else 0.0),
               "migrations": 2 if k == at else 0} for k in range(32)]
    return events, tokens


def test_the_twins_own_decisions_are_the_same() -> None:
    d = twin.decisions(*rows())
    assert d["replans"][2] == (25, "emergency:link_change@gateway->pi-a", 2)
    assert d["moved"] == [(25, "head.0.3", "pi-a", "pi-b"), (25, "head.0.4", "pi-a", "pi-b")]
    assert d["stall_ms"] == {25: 90.0}
    c = twin.same_decisions(d, twin.decisions(*rows()))
    assert c["same"] and c["problems"] == [] and c["worst_stall_error"] == 0.0


@pytest.mark.parametrize("real, says", [
    (rows(moves_to="phone"), "moved blocks differ"),
    (rows(at=26), "re-plans differ"),
    (rows(reason="interval"), "re-plans differ"),
    (rows(stall=90.0 * (1 + twin.DECISION_STALL_TOLERANCE + EPS)), "token 25: stall"),
    (rows(stall=90.0 * (1 - twin.DECISION_STALL_TOLERANCE - EPS)), "token 25: stall"),
])
def test_other_decisions_are_named(real: tuple[list[dict[str, Any]], list[dict[str, Any]]], says: str) -> None:
    c = twin.same_decisions(twin.decisions(*real), twin.decisions(*rows()))
    assert not c["same"] and any(p.startswith(says) for p in c["problems"]), c["problems"]


@pytest.mark.parametrize("sign", [1, -1])
def test_decision_stall_just_inside(sign: int) -> None:
    real = rows(stall=90.0 * (1 + sign * (twin.DECISION_STALL_TOLERANCE - EPS)))
    assert twin.same_decisions(twin.decisions(*real), twin.decisions(*rows()))["same"]


def test_the_twin_of_a_websocket_run_charges_its_framing_on_every_frame(tmp_path: Path) -> None:
    """A run over websockets sends every frame with its `due` entry (13 bytes); its virtual
    twin, in process, charges the same bytes on every frame of every link, and nothing
    else changes: the same frames, each 13 bytes more, on the same links."""
    from testbed.experiments import run as experiment
    from testbed.experiments.worlds import twin_framing
    from testbed.scenario import parse
    from testbed.transport.ws import FRAME_EXTRA

    from .conftest import scenario_dict

    assert twin_framing("inproc", False) == 0
    assert twin_framing("ws", False) == twin_framing("ws", True) == FRAME_EXTRA == 13
    prep = experiment.prepare(parse(scenario_dict(new_tokens=4)))
    sent: dict[int, dict[tuple[str, str], tuple[int, int]]] = {}
    for framing in (0, FRAME_EXTRA):

        def record(world: Any, controller: Any, framing: int = framing) -> None:
            sent[framing] = {k: (l.frames_sent, l.bytes_sent) for k, l in world.net.links.items()}
        out = experiment.run(prep, "resource_aware", tmp_path / str(framing), clock="virtual",
                             framing=framing, on_finish=record)
        assert out.ok
        meta = json.loads((out.run_dir / "meta.json").read_text())
        assert meta.get("charged_framing") == (framing or None)
    assert any(frames for frames, _ in sent[0].values())
    for link, (frames, nbytes) in sent[0].items():
        assert sent[FRAME_EXTRA][link] == (frames, nbytes + FRAME_EXTRA * frames), link
    with pytest.raises(ValueError, match="in process only"):
        experiment.run(prep, "resource_aware", tmp_path / "ws", transport="ws", framing=FRAME_EXTRA)
