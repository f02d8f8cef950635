"""`--links kernel` for a run of agent processes: the run's namespaces and shaped veth pairs
(netplan, kernel), how an agent is started in its namespace and reached, and what a
`set_link` does to the qdiscs.

Every device of the scenario (joining ones too) gets a namespace at the start; its agent
runs there (`ip netns exec`), listens on all of that namespace's addresses, is reached by
the runner over its unshaped control veth and by its peers at its own address over the
shaped veth pairs. Under time dilation K the kernel shapes rate / K. Latency is added by
the emulator at the sender, before the frame is written (testbed/transport/ws.py,
`kernel_links`): this project's kernels lack netem; whether this one has it is detected
and recorded in meta.json (`kernel_links`), with how latency was added. A `set_link`
changes both directions' tbf (a rate of 0 sets the ends down) and, through the agents, the
latency; `fail_device` sets the device's ends down. The runner's process owns the
namespaces, so they go with `stop()`, Ctrl-C included, or with the next run's start after
a runner that was killed.
"""

from __future__ import annotations

from typing import Any

from ..scenario.records import LinkSpec, Scenario, SetLink
from . import kernel
from .kernel import KernelLinks
from .netplan import Shape, isolate, plan, shape


def link_spec(scen: Scenario, a: str, b: str) -> LinkSpec:
    """The scenario's link between a and b, joining devices' own links included."""
    joins = scen.joins()
    for x, y in ((a, b), (b, a)):
        if x in joins:
            return joins[x].links.get(y, scen.network.default)
    return scen.network.link(a, b)


class KernelWorld:
    def __init__(self, scen: Scenario, time_scale: float) -> None:
        self.time_scale = time_scale
        self.devices = [d.name for d in scen.devices] + [n for n in scen.joins() if n not in scen.device_names]
        self.specs = {(a, b): link_spec(scen, a, b) for a in self.devices for b in self.devices if a != b}
        self.plan = plan(kernel.me(), self.devices,
                         {k: shape(s.bandwidth_mbps, s.burst_kib, time_scale) for k, s in self.specs.items()},
                         control=True)
        self.links = KernelLinks(self.plan)

    def up(self) -> None:
        self.links.__enter__()

    def down(self) -> None:
        self.links.remove()

    def agent_command(self, device: str, argv: list[str]) -> list[str]:
        """The agent's command line, run in its namespace, listening on its addresses."""
        return [*self.links.exec_prefix(device), *argv, "--host", "0.0.0.0", "--allow-remote", "--links", "kernel"]

    def urls(self, device: str, port: int) -> tuple[str, str]:
        """Where the runner reaches the agent (control veth), where its peers do (its address)."""
        return f"http://{self.plan.control_address(device)}:{port}", f"http://{self.plan.address(device)}:{port}"

    async def set_link(self, c: SetLink) -> str:
        """The change's rate and burst, both directions, on the qdiscs; the latency is the
        agents' (netem-less kernel)."""
        if c.bandwidth_mbps is None and c.burst_kib is None:
            return "qdiscs unchanged"
        a, b = c.between
        out = []
        for s, d in ((a, b), (b, a)):
            old = self.specs[(s, d)]
            new = LinkSpec(old.bandwidth_mbps if c.bandwidth_mbps is None else c.bandwidth_mbps, old.latency_ms,
                           old.burst_kib if c.burst_kib is None else c.burst_kib)
            self.specs[(s, d)] = new
            tbf: Shape = shape(new.bandwidth_mbps, new.burst_kib, self.time_scale)
            await self.links.reshape(s, d, tbf)
            out.append(f"{s}->{d} " + ("down" if tbf.down else f"tbf rate {tbf.rate * 8 / 1e6:g} Mbit/s "
                                                                 f"burst {tbf.burst} B (wall clock)"))
        return "; ".join(out)

    async def fail(self, device: str) -> str:
        """fail_device: the device's ends of its veth pairs go down."""
        cmds = isolate(self.plan, device)
        for cmd in cmds:
            await kernel.run_async(cmd)
        return f"its {len(cmds)} veth ends set down"

    def info(self) -> dict[str, Any]:
        """What meta.json records of the run's links."""
        return {
            "mode": "kernel", "time_scale": self.time_scale, "netem": self.links.netem,
            "latency": "added by the emulator at the sender, before the frame is written "
                       + ("(netem is available but not used)" if self.links.netem else "(this kernel has no netem)"),
            "namespaces": dict(zip(self.devices, self.plan.namespaces, strict=True)),
            "addresses": dict(zip(self.devices, self.plan.addresses, strict=True)),
            "reaped": {"namespaces": self.links.reaped[0], "links": self.links.reaped[1]},
        }
