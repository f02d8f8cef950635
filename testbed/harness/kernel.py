"""The shell around `netplan`: runs a plan's `ip`/`tc` commands (each bounded in time),
removes it again, and removes what runs whose process is gone left behind.

`refusal()` says in one line why kernel links cannot be used here (not root, `ip` or `tc`
missing), or None. `KernelLinks(plan)` is a context manager: entering removes stale
leftovers of dead runs and builds the plan (removing what it built if a command fails),
leaving removes it; `reshape` changes a direction's qdisc during a run. Nothing here
touches a namespace or interface whose name does not say it is ours (`netplan.PREFIX`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

from . import netplan
from .netplan import Owner, Plan, Shape

COMMAND_TIMEOUT_S = 10.0  # wall seconds one ip/tc command may take


class KernelError(RuntimeError):
    """An ip/tc command failed; the message is one line naming it."""


def refusal() -> str | None:
    """Why `--links kernel` cannot run here, in one line; None if it can."""
    if os.geteuid() != 0:
        return "--links kernel needs root (network namespaces, veth pairs and tc)"
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        return f"--links kernel needs {' and '.join(missing)} (iproute2) on the PATH"
    return None


def start_time(pid: int) -> int | None:
    """A process's start time (clock ticks since boot); None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    return int(stat[stat.rindex(")") + 2:].split()[19])


def me() -> Owner:
    start = start_time(os.getpid())
    assert start is not None
    return Owner(os.getpid(), start)


def run(cmd: list[str], timeout: float = COMMAND_TIMEOUT_S, check: bool = True) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise KernelError(f"{' '.join(cmd)}: no answer within {timeout:g} s") from None
    if check and r.returncode != 0:
        why = (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}").splitlines()[0]
        raise KernelError(f"{' '.join(cmd)}: {why}")
    return r.stdout


async def run_async(cmd: list[str], timeout: float = COMMAND_TIMEOUT_S) -> None:
    """`run` for a running loop (scenario events): the loop keeps turning meanwhile."""
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise KernelError(f"{' '.join(cmd)}: no answer within {timeout:g} s") from None
    if proc.returncode != 0:
        why = (err.decode(errors="replace").strip() or f"exit {proc.returncode}").splitlines()[0]
        raise KernelError(f"{' '.join(cmd)}: {why}")


def namespaces() -> list[str]:
    """Every network namespace with a name (`ip netns list`), ours or not."""
    return [line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line.strip()]


def host_links() -> list[str]:
    """Every interface of the host's namespace."""
    out = []
    for line in run(["ip", "-o", "link", "show"]).splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            out.append(parts[1].strip().split("@")[0])
    return out


def ours() -> tuple[list[str], list[str]]:
    """The namespaces and host links whose names say they belong to some run."""
    return ([n for n in namespaces() if netplan.namespace_owner(n) is not None],
            [n for n in host_links() if netplan.control_owner_pid(n) is not None])


def reap() -> tuple[list[str], list[str]]:
    """Remove what runs whose process is gone left behind; returns what was removed."""
    ns, links = ours()
    pids = {o.pid for n in ns if (o := netplan.namespace_owner(n))} | \
        {p for n in links if (p := netplan.control_owner_pid(n)) is not None}
    dead_ns, dead_links = netplan.stale(ns, links, {p: start_time(p) for p in pids})
    present = set(host_links())  # a veth's other end may have taken it along already
    for n in dead_links:
        if n in present:
            run(["ip", "link", "delete", n], check=False)
    for n in dead_ns:
        run(["ip", "netns", "delete", n], check=False)
    return dead_ns, dead_links


def has_netem(ns: str) -> bool:
    """Whether this kernel offers netem: tried on the loopback of one of our namespaces."""
    try:
        run(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
    except KernelError:
        return False
    run(["tc", "-n", ns, "qdisc", "del", "dev", "lo", "root"], check=False)
    return True


class KernelLinks:
    """A plan built in the kernel for the time of a `with` block."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.netem = False
        self.reaped: tuple[list[str], list[str]] = ([], [])

    def __enter__(self) -> KernelLinks:
        why = refusal()
        if why:
            raise KernelError(why)
        self.reaped = reap()
        try:
            for cmd in self.plan.setup():
                run(cmd)
            self.netem = has_netem(self.plan.namespaces[0])
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        present = set(namespaces()) | set(host_links())
        for cmd in self.plan.teardown():
            if cmd[-1] in present:
                run(cmd, check=False)

    async def reshape(self, src: str, dst: str, new: Shape) -> None:
        for cmd in self.plan.reshape(src, dst, new):
            await run_async(cmd)

    def exec_prefix(self, device: str) -> list[str]:
        """What to put before a command to run it in the device's namespace."""
        return ["ip", "netns", "exec", self.plan.namespace(device)]
