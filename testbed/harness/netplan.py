"""The plan of a run's kernel links (`--links kernel`): network namespaces, veth pairs,
addresses and token-bucket filters, as data and as the `ip`/`tc` commands that build and
remove them. Pure: no IO, no clock, no subprocess; `kernel.py` is the shell that runs the
commands.

One namespace per device; every pair of devices is joined by a veth pair created directly
inside the two namespaces (no end ever lives in the host's namespace), each end shaped by
tbf for its direction: the scenario's rate divided by the time scale K (time dilation: the
kernel runs on the wall clock, the emulation K times slower) and its burst, at least one
full Ethernet frame (tbf refuses a packet larger than its bucket). Each device owns one
address on its loopback, `DEVICES` + index, reached from each peer through the veth pair
between them (a /31 per pair in `PAIRS`). Optionally (`control=True`) each namespace also
gets an unshaped veth to the host's namespace (`CONTROL`, a /31 each), for the runner's
control connection. There is no default route anywhere: nothing leaves the namespaces but
to their peers and, over the control veth, to the host. Every address is in 198.18.0.0/15,
the range reserved for benchmarking (RFC 2544).

Names say whose they are: namespaces `tbk-<pid>-<start>-<i>` (the owning process and its
start time in clock ticks since boot, so a reused pid is not mistaken for the owner), host
ends of control veths `tbk<pid>c<i>` (interface names have at most 15 characters). A run
removes what it created; at its start it removes what belongs to processes that are gone
(`stale`), and never anything else.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from itertools import combinations

PREFIX = "tbk"
BENCH = ipaddress.IPv4Network("198.18.0.0/15")
DEVICES = ipaddress.IPv4Network("198.18.0.0/24")  # one /32 per device, on its loopback
PAIRS = ipaddress.IPv4Network("198.18.128.0/17")  # one /31 per device pair
CONTROL = ipaddress.IPv4Network("198.19.0.0/17")  # one /31 per device: host end, namespace end
MAX_DEVICES = 250
ETH_FRAME = 1514  # the largest packet tbf sees on a veth of MTU 1500: 1500 + the Ethernet header
QUEUE_LIMIT = 4 * 1024 * 1024  # bytes tbf may queue; above TCP small queues' 1 MiB per socket
MIN_RATE = 8.0  # bytes/s: tbf cannot hold a rate of 0; a link that is down is set down instead

_NS = re.compile(rf"^{PREFIX}-(\d+)-(\d+)-(\d+)$")
_CTL = re.compile(rf"^{PREFIX}(\d+)c(\d+)$")


class PlanError(ValueError):
    """A plan that cannot be made (too many devices, a bad time scale)."""


@dataclass(frozen=True)
class Owner:
    """The process a run's namespaces belong to: its pid and start time (clock ticks since
    boot, /proc/<pid>/stat field 22)."""

    pid: int
    start: int

    def namespace(self, i: int) -> str:
        return f"{PREFIX}-{self.pid}-{self.start}-{i}"

    def control_dev(self, i: int) -> str:
        name = f"{PREFIX}{self.pid}c{i}"
        if len(name) > 15:
            raise PlanError(f"interface name {name!r} is longer than 15 characters")
        return name


def namespace_owner(name: str) -> Owner | None:
    """The owner a namespace name says it has; None for a name that is not ours."""
    m = _NS.match(name)
    return Owner(int(m.group(1)), int(m.group(2))) if m else None


def control_owner_pid(name: str) -> int | None:
    """The pid in a control veth's host-side name; None for a name that is not ours."""
    m = _CTL.match(name)
    return int(m.group(1)) if m else None


def stale(namespaces: list[str], links: list[str], alive: dict[int, int | None]) -> tuple[list[str], list[str]]:
    """What earlier runs left behind: our namespaces and host-side control links whose owner
    is gone. `alive` maps each pid named to its current start time (None: no such process).
    A namespace whose pid lives with another start time is stale too (the pid was reused);
    a link (which names no start time) is stale only when its pid is gone."""
    ns = [n for n in namespaces if (o := namespace_owner(n)) is not None and alive.get(o.pid) != o.start]
    ln = [n for n in links if (p := control_owner_pid(n)) is not None and alive.get(p) is None]
    return ns, ln


@dataclass(frozen=True)
class Shape:
    """One direction's token-bucket filter, as the kernel sees it (wall-clock rate)."""

    rate: float  # bytes per wall second
    burst: int  # bytes
    limit: int = QUEUE_LIMIT  # bytes

    @property
    def down(self) -> bool:
        return self.rate < MIN_RATE

    def tbf(self) -> list[str]:
        """The qdisc's arguments after `tc qdisc replace dev X root`."""
        return ["tbf", "rate", f"{max(round(self.rate * 8), 8)}bit", "burst", str(self.burst),
                "limit", str(self.limit)]


def shape(bandwidth_mbps: float, burst_kib: float, time_scale: float) -> Shape:
    """The tbf of a scenario link under time dilation K: rate / K, the scenario's burst (at
    least one Ethernet frame, which tbf needs)."""
    if not time_scale > 0:
        raise PlanError(f"time scale must be > 0, not {time_scale}")
    if bandwidth_mbps < 0 or burst_kib < 0:
        raise PlanError(f"a link needs a rate and burst >= 0, not {bandwidth_mbps} Mbit/s, {burst_kib} KiB")
    return Shape(bandwidth_mbps * 1e6 / 8 / time_scale, max(ETH_FRAME, round(burst_kib * 1024)))


@dataclass(frozen=True)
class End:
    """One end of a veth pair: its namespace, interface, address (/31) and egress shape."""

    ns: str
    dev: str
    addr: str
    shape: Shape | None  # None: unshaped (control)


@dataclass(frozen=True)
class Pair:
    """A veth pair between devices i and j (i < j)."""

    i: int
    j: int
    a: End  # in i's namespace: shapes i -> j
    b: End  # in j's namespace: shapes j -> i


@dataclass(frozen=True)
class Control:
    """An unshaped veth between the host's namespace and a device's."""

    i: int
    host_dev: str
    host_addr: str
    ns_dev: str
    ns_addr: str


@dataclass(frozen=True)
class Plan:
    owner: Owner
    devices: tuple[str, ...]
    namespaces: tuple[str, ...]
    addresses: tuple[str, ...]  # each device's own address (on its loopback)
    pairs: tuple[Pair, ...]
    controls: tuple[Control, ...]

    def index(self, device: str) -> int:
        return self.devices.index(device)

    def namespace(self, device: str) -> str:
        return self.namespaces[self.index(device)]

    def address(self, device: str) -> str:
        return self.addresses[self.index(device)]

    def control_address(self, device: str) -> str:
        """Where the host reaches the device's namespace (over its control veth)."""
        i = self.index(device)
        return next(c.ns_addr for c in self.controls if c.i == i)

    def pair(self, src: str, dst: str) -> End:
        """The end that carries src -> dst (in src's namespace)."""
        i, j = self.index(src), self.index(dst)
        p = next(p for p in self.pairs if {p.i, p.j} == {i, j})
        return p.a if p.i == i else p.b

    def setup(self) -> list[list[str]]:
        """The commands that build the plan, in order."""
        cmds = [["ip", "netns", "add", ns] for ns in self.namespaces]
        for ns, addr in zip(self.namespaces, self.addresses, strict=True):
            cmds += [["ip", "-n", ns, "link", "set", "lo", "up"],
                     ["ip", "-n", ns, "addr", "add", f"{addr}/32", "dev", "lo"]]
        for p in self.pairs:
            cmds.append(["ip", "link", "add", p.a.dev, "netns", p.a.ns, "type", "veth",
                         "peer", "name", p.b.dev, "netns", p.b.ns])
            for end, far, peer_addr, src in ((p.a, p.b, self.addresses[p.j], self.addresses[p.i]),
                                             (p.b, p.a, self.addresses[p.i], self.addresses[p.j])):
                cmds += [["ip", "-n", end.ns, "addr", "add", f"{end.addr}/31", "dev", end.dev],
                         ["ip", "-n", end.ns, "link", "set", end.dev, "up"]]
                if end.shape is not None:
                    cmds.append(self.qdisc(end))
                cmds.append(["ip", "-n", end.ns, "route", "add", f"{peer_addr}/32", "via", far.addr,
                             "dev", end.dev, "src", src])
        for c in self.controls:
            ns = self.namespaces[c.i]
            cmds += [["ip", "link", "add", c.host_dev, "type", "veth", "peer", "name", c.ns_dev, "netns", ns],
                     ["ip", "addr", "add", f"{c.host_addr}/31", "dev", c.host_dev],
                     ["ip", "link", "set", c.host_dev, "up"],
                     ["ip", "-n", ns, "addr", "add", f"{c.ns_addr}/31", "dev", c.ns_dev],
                     ["ip", "-n", ns, "link", "set", c.ns_dev, "up"]]
        return cmds

    def teardown(self) -> list[list[str]]:
        """The commands that remove it: the control veths' host ends first (the kernel
        destroys a deleted namespace's interfaces later, in the background; deleting a veth
        end removes its peer at once), then the namespaces, which take their veths along."""
        return [["ip", "link", "delete", c.host_dev] for c in self.controls] + \
            [["ip", "netns", "delete", ns] for ns in self.namespaces]

    @staticmethod
    def qdisc(end: End) -> list[str]:
        """The command that sets an end's tbf (also to change it: `replace`)."""
        assert end.shape is not None
        return ["tc", "-n", end.ns, "qdisc", "replace", "dev", end.dev, "root", *end.shape.tbf()]

    def reshape(self, src: str, dst: str, new: Shape) -> list[list[str]]:
        """The commands that give the direction src -> dst a new shape (a rate of 0: the end
        is set down; a rate again: up, with the new tbf)."""
        end = self.pair(src, dst)
        if new.down:
            return [["ip", "-n", end.ns, "link", "set", end.dev, "down"]]
        return [self.qdisc(End(end.ns, end.dev, end.addr, new)),
                ["ip", "-n", end.ns, "link", "set", end.dev, "up"]]


def isolate(plan_: Plan, device: str) -> list[list[str]]:
    """The commands that cut a device off (fail_device): its ends of every veth pair down."""
    i = plan_.index(device)
    ends = [p.a if p.i == i else p.b for p in plan_.pairs if i in (p.i, p.j)]
    return [["ip", "-n", e.ns, "link", "set", e.dev, "down"] for e in ends]


def _host(net: ipaddress.IPv4Network, k: int) -> str:
    return str(net.network_address + k)


def plan(owner: Owner, devices: list[str], shapes: dict[tuple[str, str], Shape],
         control: bool = False) -> Plan:
    """The namespaces, veth pairs and shapes for `devices`; `shapes[(src, dst)]` is the
    tbf of each ordered pair (every one must be there)."""
    if not 1 <= len(devices) <= MAX_DEVICES:
        raise PlanError(f"kernel links take 1 to {MAX_DEVICES} devices, not {len(devices)}")
    if len(set(devices)) != len(devices):
        raise PlanError("device names must be distinct")
    names = tuple(owner.namespace(i) for i in range(len(devices)))
    addrs = tuple(_host(DEVICES, i + 1) for i in range(len(devices)))
    pairs = []
    for k, (i, j) in enumerate(combinations(range(len(devices)), 2)):
        a, b = devices[i], devices[j]
        missing = [f"{s}->{d}" for s, d in ((a, b), (b, a)) if (s, d) not in shapes]
        if missing:
            raise PlanError(f"no shape for {', '.join(missing)}")
        pairs.append(Pair(i, j, End(names[i], f"p{j}", _host(PAIRS, 2 * k), shapes[(a, b)]),
                          End(names[j], f"p{i}", _host(PAIRS, 2 * k + 1), shapes[(b, a)])))
    controls = tuple(Control(i, owner.control_dev(i), _host(CONTROL, 2 * i), "ctl", _host(CONTROL, 2 * i + 1))
                     for i in range(len(devices))) if control else ()
    return Plan(owner, tuple(devices), names, addrs, tuple(pairs), controls)
