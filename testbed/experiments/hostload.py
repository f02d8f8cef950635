"""The host's own CPU and memory during a run (psutil), for the run's check of itself.

A real-clock run is faithful only if the host kept up with the emulated windows; when it
did not, the first question is whether the run's own work was too much for the time scale
or whether other processes took the CPU. `HostMonitor` answers it: the CPU time of the
run's processes (the runner and its agent processes), the CPU time everything else on the
machine took meanwhile, and each process's resident memory at the end. It reads counters
only at the start and the end, so it costs nothing during the run.
"""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

BUSY_SHARE = 0.25  # other processes took more than this share of the wall time: a loaded host


def other_share(host: dict[str, Any] | None) -> float | None:
    """The CPUs other processes took during a run, as a share of its wall time (from
    `HostMonitor.stop()`'s record); None without a record."""
    if not host or not host.get("wall_s"):
        return None
    return host["other_cpu_s"] / host["wall_s"]


def loaded(host: dict[str, Any] | None) -> bool:
    """Whether other processes took a good part of the host during the run."""
    share = other_share(host)
    return share is not None and share > BUSY_SHARE


def _busy(t: Any) -> float:
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _cpu(p: psutil.Process) -> float:
    c = p.cpu_times()
    return c.user + c.system


class HostMonitor:
    def __init__(self) -> None:
        self.me = psutil.Process()
        self.wall0 = time.perf_counter()
        self.sys0 = psutil.cpu_times()
        self.me0 = _cpu(self.me)

    def stop(self, agents: dict[str, int] | None = None) -> dict[str, Any]:
        """Totals since the start; `agents` maps agent names to the pids of their processes
        (started during the run, so all their CPU time is the run's)."""
        wall = time.perf_counter() - self.wall0
        busy = _busy(psutil.cpu_times()) - _busy(self.sys0)
        run = _cpu(self.me) - self.me0
        rss = {"runner": round(self.me.memory_info().rss / 2**20, 1)}
        for name, pid in (agents or {}).items():
            try:
                p = psutil.Process(pid)
                run += _cpu(p)
                rss[name] = round(p.memory_info().rss / 2**20, 1)
            except psutil.Error:  # it has already gone (a failed device)
                pass
        cpus = psutil.cpu_count() or 1
        return {"cpus": cpus, "wall_s": round(wall, 3), "run_cpu_s": round(run, 3),
                "other_cpu_s": round(max(0.0, busy - run), 3),
                "busy_fraction": round(min(1.0, busy / (wall * cpus)) if wall > 0 else 0.0, 3),
                "load_avg_1m": round(os.getloadavg()[0], 2), "rss_mib": rss}
