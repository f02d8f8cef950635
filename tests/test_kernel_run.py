"""`runners.run --processes --links kernel` leaves nothing behind: the host's namespaces,
interfaces and qdiscs (and every named namespace's) are listed before and after a normal
run, a run interrupted by SIGINT, and a run whose runner was killed (SIGKILL), after which
the next start removes what it left. Every wait is bounded. Skips (with the reason) where
the runner is not root or lacks ip/tc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.harness import kernel

WHY = kernel.refusal()
pytestmark = pytest.mark.skipif(WHY is not None, reason=WHY or "")

ROOT = Path(__file__).resolve().parents[1]
RUN_S = 300.0  # wall seconds a short run may take on a busy 2-core host


def state() -> dict[str, str]:
    """Namespaces, the host's links and qdiscs, and each named namespace's links and qdiscs."""
    out = {"netns": kernel.run(["ip", "netns", "list"]),
           "links": "\n".join(sorted(kernel.host_links())),
           "qdiscs": kernel.run(["tc", "qdisc", "show"])}
    for ns in kernel.namespaces():
        out[f"{ns} links"] = kernel.run(["ip", "-n", ns, "-o", "link", "show"], check=False)
        out[f"{ns} qdiscs"] = kernel.run(["tc", "-n", ns, "qdisc", "show"], check=False)
    return out


def runner(tmp: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "runners.run", "scenarios/bandwidth_drop.yaml", "--processes",
                             "--links", "kernel", "--tokens", "2", "--time-scale", "8", "--quiet",
                             "--out", str(tmp)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def ours_of(pid: int) -> list[str]:
    return [n for n in kernel.namespaces() if n.startswith(f"tbk-{pid}-")]


def wait_for_agents(proc: subprocess.Popen[str]) -> list[str]:
    """Wait until the runner's namespaces exist and an agent runs in each; their names."""
    end = time.monotonic() + RUN_S
    while time.monotonic() < end and proc.poll() is None:
        names = ours_of(proc.pid)
        if len(names) == 4 and all(kernel.run(["ip", "netns", "pids", n], check=False).strip() for n in names):
            return names
        time.sleep(0.2)
    raise AssertionError(f"no agents in namespaces within {RUN_S:g} s (exit {proc.poll()})")


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=RUN_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError("the runner did not end in time") from None
    return proc.returncode, out, err


def test_a_normal_run_completes_and_leaves_nothing(tmp_path: Path) -> None:
    before = state()
    code, out, err = finish(runner(tmp_path))
    assert code == 0, err
    assert out.startswith("completed ")
    assert state() == before


def test_an_interrupted_run_leaves_nothing(tmp_path: Path) -> None:
    before = state()
    proc = runner(tmp_path)
    names = wait_for_agents(proc)
    assert set(names) <= set(kernel.namespaces())
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)
    assert code == 130, err
    assert state() == before


def test_a_killed_runners_leftovers_go_at_the_next_start_and_no_one_elses(tmp_path: Path) -> None:
    before = state()
    # a namespace of ours whose owner lives (this test's process): the next start keeps it
    live = kernel.me().namespace(99)
    kernel.run(["ip", "netns", "add", live])
    try:
        proc = runner(tmp_path)
        names = wait_for_agents(proc)
        os.kill(proc.pid, signal.SIGKILL)
        finish(proc)
        assert set(names) <= set(kernel.namespaces())  # left behind by the killed runner
        # its agents die with it (PR_SET_PDEATHSIG): the namespaces empty out
        end = time.monotonic() + 30
        while time.monotonic() < end and any(kernel.run(["ip", "netns", "pids", n], check=False).strip()
                                             for n in names):
            time.sleep(0.2)
        code, _, err = finish(runner(tmp_path))  # the next start removes them
        assert code == 0, err
        assert live in kernel.namespaces()
    finally:
        kernel.run(["ip", "netns", "delete", live], check=False)
    assert state() == before
