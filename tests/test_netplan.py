"""The kernel links' plan (testbed/harness/netplan.py): pure, checked as data."""

from __future__ import annotations

import ipaddress

import pytest

from testbed.harness import netplan
from testbed.harness.netplan import Owner, PlanError, Shape, plan, shape, stale

OWNER = Owner(4242, 987654)


def _plan(devices: list[str], k: float = 1.0, control: bool = False) -> netplan.Plan:
    shapes = {(a, b): shape(10.0 * (i + 1), 4.0, k) for i, a in enumerate(devices) for b in devices if a != b}
    return plan(OWNER, devices, shapes, control)


def test_shape_divides_the_rate_by_the_time_scale_and_keeps_the_burst() -> None:
    s = shape(100.0, 64.0, 4.0)
    assert s.rate == pytest.approx(100e6 / 8 / 4)
    assert s.burst == 64 * 1024
    assert s.tbf()[:4] == ["tbf", "rate", "25000000bit", "burst"]


def test_a_burst_below_one_ethernet_frame_is_raised_to_one() -> None:
    assert shape(10.0, 0.0, 1.0).burst == netplan.ETH_FRAME
    assert shape(10.0, 1.0, 1.0).burst == netplan.ETH_FRAME  # 1024 < 1514
    assert shape(10.0, 2.0, 1.0).burst == 2048


def test_bad_time_scales_and_rates_are_refused() -> None:
    with pytest.raises(PlanError, match="time scale"):
        shape(10.0, 0.0, 0.0)
    with pytest.raises(PlanError, match="rate"):
        shape(-1.0, 0.0, 1.0)


def test_every_pair_gets_one_veth_pair_shaped_per_direction() -> None:
    p = _plan(["a", "b", "c"])
    assert len(p.namespaces) == 3 and len(p.pairs) == 3
    assert p.namespaces[0] == "tbk-4242-987654-0"
    # a -> c is shaped at a's rate (10 Mbit/s), c -> a at c's (30 Mbit/s)
    assert p.pair("a", "c").shape == shape(10.0, 4.0, 1.0)
    assert p.pair("c", "a").shape == shape(30.0, 4.0, 1.0)
    assert p.pair("a", "c").ns == p.namespace("a") and p.pair("c", "a").ns == p.namespace("c")


def test_addresses_are_distinct_and_inside_the_benchmarking_range() -> None:
    p = _plan([f"d{i}" for i in range(12)], control=True)
    addrs = list(p.addresses) + [e.addr for q in p.pairs for e in (q.a, q.b)] + \
        [a for c in p.controls for a in (c.host_addr, c.ns_addr)]
    assert len(set(addrs)) == len(addrs)
    assert all(ipaddress.ip_address(a) in netplan.BENCH for a in addrs)
    # the two ends of each pair share one /31
    for q in p.pairs:
        assert ipaddress.ip_interface(f"{q.a.addr}/31").network == ipaddress.ip_interface(f"{q.b.addr}/31").network


def test_setup_has_no_default_route_and_no_shaped_end_outside_the_namespaces() -> None:
    cmds = _plan(["a", "b", "c"], control=True).setup()
    routes = [c for c in cmds if "route" in c]
    assert routes and all(c[c.index("add") + 1].endswith("/32") for c in routes)
    assert not any("default" in c for c in cmds)
    # veth pairs between devices are created inside the namespaces, never in the host's
    for c in cmds:
        if c[:3] == ["ip", "link", "add"] and "ctl" not in c:
            assert c[4] == "netns" and c[-2] == "netns"
    # every shaped end has its tbf
    assert sum(1 for c in cmds if c[0] == "tc") == 6


def test_teardown_deletes_exactly_the_plans_namespaces() -> None:
    p = _plan(["a", "b"])
    assert p.teardown() == [["ip", "netns", "delete", n] for n in p.namespaces]
    pc = _plan(["a", "b"], control=True)
    assert pc.teardown()[:2] == [["ip", "link", "delete", c.host_dev] for c in pc.controls]


def test_reshape_sets_a_new_tbf_or_takes_the_end_down() -> None:
    p = _plan(["a", "b"])
    up = p.reshape("a", "b", shape(1.0, 0.0, 2.0))
    assert up[0][:2] == ["tc", "-n"] and "500000bit" in up[0] and up[1][-1] == "up"
    assert p.reshape("b", "a", Shape(0.0, 1514))[0][-1] == "down"


def test_plans_refuse_what_they_cannot_build() -> None:
    with pytest.raises(PlanError, match="no shape for b->a"):
        plan(OWNER, ["a", "b"], {("a", "b"): shape(1.0, 0.0, 1.0)})
    with pytest.raises(PlanError, match="distinct"):
        _plan(["a", "a"])
    with pytest.raises(PlanError, match="devices"):
        plan(OWNER, [], {})


def test_stale_names_only_our_leftovers_of_dead_or_reused_pids() -> None:
    ns = ["tbk-10-5-0", "tbk-10-5-1", "tbk-11-7-0", "tbk-12-9-0", "other", "tbk-x-1-0", "tbkfoo"]
    links = ["tbk10c0", "tbk11c0", "eth0", "tbk12c3"]
    # 10 is gone, 11 lives (same start), 12 was reused by another process (other start)
    dead_ns, dead_links = stale(ns, links, {10: None, 11: 7, 12: 99})
    assert dead_ns == ["tbk-10-5-0", "tbk-10-5-1", "tbk-12-9-0"]
    assert dead_links == ["tbk10c0"]


def test_names_parse_back_to_their_owner() -> None:
    assert netplan.namespace_owner(OWNER.namespace(3)) == OWNER
    assert netplan.control_owner_pid(OWNER.control_dev(3)) == 4242
    assert netplan.namespace_owner("tbk-1-2") is None
    with pytest.raises(PlanError, match="15 characters"):
        Owner(123456789012, 1).control_dev(0)


def test_kernel_links_are_refused_in_one_line_without_root_or_iproute2(monkeypatch: pytest.MonkeyPatch) -> None:
    from testbed.harness import kernel

    monkeypatch.setattr(kernel.os, "geteuid", lambda: 1000)
    assert kernel.refusal() == "--links kernel needs root (network namespaces, veth pairs and tc)"
    monkeypatch.setattr(kernel.os, "geteuid", lambda: 0)
    monkeypatch.setattr(kernel.shutil, "which", lambda t: None if t == "tc" else "/sbin/" + t)
    assert kernel.refusal() == "--links kernel needs tc (iproute2) on the PATH"


@pytest.mark.parametrize("extra, why", [
    (("--processes",), "--links kernel needs root (network namespaces, veth pairs and tc)"),
    ((), "add --processes"),
])
def test_runners_run_refuses_kernel_links_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str],
                                                      tmp_path: object, extra: tuple[str, ...], why: str) -> None:
    from runners import run
    from testbed.harness import kernel

    monkeypatch.setattr(kernel.os, "geteuid", lambda: 1000)  # as a user who is not root
    status = run.main(["scenarios/bandwidth_drop.yaml", "--links", "kernel", *extra, "--out", str(tmp_path)])
    err = capsys.readouterr().err.rstrip("\n")
    assert status == 2
    assert "\n" not in err and err.startswith("error: scenarios/bandwidth_drop.yaml: --links: ") and why in err


def test_isolate_sets_down_exactly_the_devices_own_ends() -> None:
    p = _plan(["a", "b", "c"])
    cmds = netplan.isolate(p, "b")
    assert cmds == [["ip", "-n", p.namespace("b"), "link", "set", p.pair("b", "a").dev, "down"],
                    ["ip", "-n", p.namespace("b"), "link", "set", p.pair("b", "c").dev, "down"]]
