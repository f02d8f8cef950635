"""tools/digest.py: what two virtual-clock runs of the same code may differ in is left out of
a result file's digest, and nothing else."""

from __future__ import annotations

import json

from tools.digest import canonical


def test_decision_times_wall_time_and_provenance_do_not_count() -> None:
    ev = b"t_s,token,kind,subject,detail\n0.1,0,replan,resource_aware,reason=initial decision_ms=21.337 moves=40\n"
    ev2 = ev.replace(b"21.337", b"0.895")
    assert canonical("events.csv", ev) == canonical("events.csv", ev2)
    s1 = {"latency_ms": {"mean": 13.01}, "wall_s": 2.3, "host": {"cpus": 2}, "decision_ms": {"max": 21.3}}
    s2 = {**s1, "wall_s": 9.1, "host": {"cpus": 4}, "decision_ms": {"max": 0.9}}
    assert canonical("summary.json", json.dumps(s1).encode()) == canonical("summary.json", json.dumps(s2).encode())
    m1 = {"seed": 0, "start": "a", "end": "b", "git_revision": "abc", "host": "h", "torch": "2"}
    m2 = {**m1, "start": "c", "end": "d", "git_revision": "def", "host": "g"}
    assert canonical("meta.json", json.dumps(m1).encode()) == canonical("meta.json", json.dumps(m2).encode())


def test_every_emulated_figure_counts() -> None:
    ev = b"0.1,0,migration,head.0.1,from=a to=b bytes=100 ms=5.0\n"
    assert canonical("events.csv", ev) != canonical("events.csv", ev.replace(b"ms=5.0", b"ms=5.1"))
    s1 = {"latency_ms": {"mean": 13.01}, "wall_s": 2.3}
    s2 = {**s1, "latency_ms": {"mean": 13.02}}
    assert canonical("summary.json", json.dumps(s1).encode()) != canonical("summary.json", json.dumps(s2).encode())
    row = b"1,0.11,9.755264,9.762944,0,0,0,349,349,decode\n"
    assert canonical("tokens.csv", row) != canonical("tokens.csv", row.replace(b"9.755264", b"9.755265"))
    m1 = {"seed": 0, "algorithm": "static"}
    assert canonical("meta.json", json.dumps(m1).encode()) != canonical("meta.json", json.dumps({**m1, "seed": 1}).encode())
