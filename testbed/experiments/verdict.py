"""A run's summary and its check of itself: summary.json's figures from the token rows and
what the run gathered, and, on the real clock, whether the host kept up with the emulated
windows (`fidelity`), with the time scale that would have been enough.

Owns `RunContext` (what one run gathers for its summary, filled in as it goes), `fidelity`
and `summarize_run`. The overrun limit is the twin comparison's (twin.OVERRUN_LIMIT): a run
whose own check passes meets that criterion of a faithful run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..agents.controller import Controller
from ..emulation import clock as clock_mod
from ..harness.interface import World
from ..harness.rows import LinkRow
from ..results.write import RunWriter, migration_detail, summarize, windows
from . import hostload
from .hooks import RunHooks
from .hostload import HostMonitor
from .prepare import Prepared
from .twin import OVERRUN_LIMIT


@dataclass
class RunContext:
    """What one run gathers for its summary, filled in as it goes: a run that fails early
    leaves the rest at these defaults (the summary then says nan or 0)."""

    host_monitor: HostMonitor
    world: World | None = None  # the emulated cluster
    controller: Controller | None = None
    hooks: RunHooks | None = None
    total_s: float = math.nan  # emulated seconds from the run's start to the last token
    frames: dict[str, int] = field(default_factory=dict)  # lost, refused
    link_rows: list[LinkRow] = field(default_factory=list)
    host: dict[str, Any] = field(default_factory=dict)  # HostMonitor's record
    wall_s: float = math.nan
    adapter: Any = None  # real clock: the time scale's watcher (adapt.Adapter), if it ran


def fidelity(clock: str, time_scale: float, overrun: float, late: float, share: float,
             host: dict[str, Any] | None = None, missed: int = 0, late_decision_s: float = 0.0,
             emulated_s: float = math.nan, decision_scale: float = 0.0,
             overrun_s: float = 0.0) -> dict[str, Any]:
    """The run's check of itself: on the real clock, did the host keep up with the emulated
    system? Three things let the host's speed into the results: jobs whose arithmetic was
    not done by their emulated finish (`overrun`, a share of the jobs; `overrun_s`, the
    emulated seconds they ended past it in all, over every device: a few jobs held up by a
    pause of the host, a garbage collection say, are a small share of the jobs but may each
    add milliseconds to a token, so more than OVERRUN_LIMIT of the run's emulated time
    distorts it too), and a report that
    reached the controller only after it had acted as of a later instant without it
    (`missed`, a count: a decision may then differ), and re-plans whose host time did not
    fit their modelled cost, when together they took more than OVERRUN_LIMIT of the run's
    emulated time (`late_decision_s` of `emulated_s`: everything after a late re-plan is
    that much later than on the virtual clock; `decision_scale`, the host time over the
    cost of the slowest re-plan, is the scale that would have fitted it). A control frame merely delivered late
    (`late`, a share of them) is acted on as of its due time and changes nothing by itself;
    it is reported, as the host's delay on the control path. `share` is the 99th percentile,
    over recent jobs of every device, of the share of its emulated window the host needed:
    about `time_scale * share` would have been just enough. A distorted run suggests one
    and a half times that (at least twice the scale used, since an overrun also delays the
    jobs behind it). `host` (HostMonitor) tells whether other processes took a good part of
    the machine meanwhile."""
    if clock != "real":
        return {"distorted": False, "reason": "virtual clock: the host's speed does not enter"}
    needed = round(time_scale * share, 2)
    slow_plans = late_decision_s > OVERRUN_LIMIT * emulated_s  # False when emulated_s is nan
    late_jobs = overrun_s > OVERRUN_LIMIT * emulated_s
    if overrun <= OVERRUN_LIMIT and not late_jobs and not missed and not slow_plans:
        return {"distorted": False, "needed_time_scale": needed,
                "reason": f"{overrun:.1%} of jobs overran (limit {OVERRUN_LIMIT:.0%}), {1e3 * overrun_s:.1f} ms past "
                          f"their emulated finish in all, no report missed a decision "
                          f"({late:.1%} of control frames delivered late, each acted on as of its due time)"}
    suggest = math.ceil(min(clock_mod.MAX_TIME_SCALE, max(2.0 * time_scale, 1.5 * needed,
                                                          1.5 * decision_scale if slow_plans else 0.0)))
    busy = ""
    if hostload.loaded(host):
        busy = (f"; other processes took {hostload.other_share(host):.1f} of the host's "
                f"{host['cpus']} CPUs meanwhile")  # type: ignore[index]  # loaded() holds only for HostMonitor's record
    missed_text = f" and {missed} report(s) reached the controller after it had acted without them" if missed else ""
    jobs_text = (f" ({1e3 * overrun_s:.1f} ms of emulated time past their finish in all, more than "
                 f"{OVERRUN_LIMIT:.0%} of the run's)") if late_jobs else ""
    plans_text = (f"; re-plans took {1e3 * late_decision_s:.1f} ms of emulated time beyond their modelled cost "
                  f"(the slowest needed time scale {decision_scale:.3g})") if slow_plans else ""
    return {"distorted": True, "needed_time_scale": needed, "suggested_time_scale": suggest,
            "reason": f"{overrun:.1%} of jobs overran their emulated windows{jobs_text}{missed_text} at time scale "
                      f"{time_scale:g} (limit {OVERRUN_LIMIT:.0%} of jobs, no report){plans_text}: the host's speed "
                      f"entered the results; about --time-scale {suggest} would fit{busy}"}


def summarize_run(prep: Prepared, w: RunWriter, ctx: RunContext,
             status: str, clock: str = "virtual", time_scale: float = 1.0) -> dict[str, Any]:
    rows = w.token_rows
    st = ctx.controller.stats if ctx.controller is not None else None
    hooks = ctx.hooks
    last = hooks.last if hooks is not None else {}
    jobs = sum(r.jobs for r in last.values())
    overruns = sum(r.overruns for r in last.values())
    overrun_s = sum(r.overrun_s for r in last.values())
    links = ctx.link_rows
    delivered = sum(r.checked for r in links)  # frames that are not re-timed
    late = sum(r.late for r in links)
    share = max((r.host_share_p99 for r in last.values()), default=0.0)
    peak = {name: r.memory.peak for name, r in last.items()}
    ids = [int(r["token_id"]) for r in rows]
    cuts = sorted({e.at_token for e in prep.scenario.events if e.at_token is not None})
    changes = ctx.adapter.changes if ctx.adapter is not None else []
    k_end = changes[-1][1] if changes else time_scale  # the run's time scale at its end
    extra: dict[str, Any] = {
        "status": status,
        "total_s": ctx.total_s,
        "emulated_s": ctx.total_s,
        "wall_s": ctx.wall_s,
        "time_scale": time_scale if clock == "real" else None,
        "oom": st.oom if st else 0,
        "replans": st.replans if st else 0,
        "emergencies": st.emergencies if st else 0,
        "failed_migrations": st.failed_migrations if st else 0,
        "refused_migrations": st.refused_migrations if st else 0,
        "decision_ms": {"mean": sum(st.decision_ms) / len(st.decision_ms) if st and st.decision_ms else math.nan,
                        "max": max(st.decision_ms) if st and st.decision_ms else math.nan},
        "late_decisions": st.late_decisions if st else 0,  # real clock: host time beyond the modelled cost
        "late_decision_ms": 1e3 * st.late_decision_s if st else 0.0,  # ... and the emulated time beyond it
        "decision_time_scale": st.decision_scale if st else 0.0,  # real clock: the slowest re-plan's host/cost
        "stalls": st.stalls if st else 0,
        "frames_lost": ctx.frames.get("lost", 0),  # to or from failed devices
        "frames_refused": ctx.frames.get("refused", 0),  # malformed, from the wire
        "recover_ms": st.recover_ms if st else [],
        "overrun_fraction": overruns / jobs if jobs else 0.0,
        "late_delivery_fraction": late / delivered if delivered else 0.0,
        "missed_reports": st.missed_reports if st else 0,
        "fidelity": fidelity(clock, k_end, overruns / jobs if jobs else 0.0,
                             late / delivered if delivered else 0.0, share, ctx.host,
                             st.missed_reports if st else 0, st.late_decision_s if st else 0.0,
                             ctx.total_s, st.decision_scale if st else 0.0, overrun_s),
        "host": ctx.host,
        "peak_memory_bytes": peak,
        "correctness": {
            "tokens_match": bool(rows) and ids == prep.ref_ids[: len(ids)] and len(ids) == len(prep.ref_ids),
            "tokens_compared": len(ids),
            "mismatches": st.mismatches if st else 0,
            "max_abs_logit_diff": st.logit_diff if st else math.nan,
        },
        "windows": windows(rows, cuts),
    }
    if st and st.migration_log:  # pre-copy runs: one record per migration
        extra["migration_detail"] = migration_detail(st.migration_log, rows)
    if clock == "real":  # the scale over time (it rises when the host falls behind) and how busy the host was
        extra["time_scales"] = [[0.0, time_scale], *([round(t, 9), k] for t, k in changes)]
        extra["overrun_ms"] = 1e3 * overrun_s  # how far past their emulated finish the overruns ended, in all
        extra["host_busy_share"] = (ctx.host or {}).get("busy_fraction")
    if prep.tokenizer is not None:
        extra["prompt_text"] = prep.prompt_text
        extra["generated_text"] = prep.tokenizer.decode(ids)
    return summarize(rows, **extra)
