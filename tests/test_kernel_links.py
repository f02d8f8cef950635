"""The kernel links' shell (testbed/harness/kernel.py) against the real kernel: a plan is
built, carries TCP between namespaces, and is removed; a dead run's leftovers are reaped
and nobody else's. Skips (with the reason) where the runner is not root or lacks ip/tc."""

from __future__ import annotations

import subprocess

import pytest

from testbed.harness import kernel, netplan
from testbed.harness.kernel import KernelLinks
from testbed.harness.netplan import Owner, plan, shape

WHY = kernel.refusal()
pytestmark = pytest.mark.skipif(WHY is not None, reason=WHY or "")


def _two(owner: Owner, control: bool = False) -> netplan.Plan:
    s = shape(8.0, 4.0, 1.0)
    return plan(owner, ["a", "b"], {("a", "b"): s, ("b", "a"): s}, control)


def test_a_plan_is_built_carries_tcp_and_is_removed() -> None:
    before = kernel.ours()
    p = _two(kernel.me(), control=True)
    with KernelLinks(p) as k:
        assert set(p.namespaces) <= set(kernel.namespaces())
        assert "tbf" in kernel.run(["tc", "-n", p.namespaces[0], "qdisc", "show", "dev", "p1"])
        # b listens on its address; a connects to it through the shaped pair
        srv = subprocess.Popen([*k.exec_prefix("b"), "python3", "-c",
                                "import socket;s=socket.socket();s.bind(('0.0.0.0',7000));s.listen();"
                                "c,_=s.accept();print(c.recv(5).decode(), flush=True)"],
                               stdout=subprocess.PIPE, text=True)
        try:
            cli = subprocess.run([*k.exec_prefix("a"), "python3", "-c",
                                  "import socket,time\nfor _ in range(50):\n try:\n"
                                  f"  s=socket.create_connection(('{p.address('b')}',7000),timeout=2);break\n"
                                  " except OSError: time.sleep(0.05)\ns.sendall(b'hello')"],
                                 timeout=20, capture_output=True, text=True)
            assert cli.returncode == 0, cli.stderr
            out, _ = srv.communicate(timeout=20)
        finally:
            srv.kill()
        assert out.strip() == "hello"
        # no route out: a's namespace has no default route
        assert "default" not in kernel.run(["ip", "-n", p.namespaces[0], "route", "show"])
    assert kernel.ours() == before


def test_leftovers_of_a_dead_owner_are_reaped_and_a_live_ones_kept() -> None:
    dead = Owner(2 ** 22 + 1, 1)  # above pid_max's ceiling: never a live process
    live = kernel.me()
    KernelLinks(_two(dead, control=True)).__enter__()  # built, never removed: a killed runner
    assert dead.namespace(0) in kernel.namespaces()
    with KernelLinks(_two(live)) as k:  # its start reaps the dead owner's, not its own
        assert dead.namespace(0) not in kernel.namespaces()
        assert dead.control_dev(0) not in kernel.host_links()
        assert k.reaped[0] == [dead.namespace(0), dead.namespace(1)]
        kernel.reap()  # a live owner's namespaces stay
        assert live.namespace(0) in kernel.namespaces()
    assert live.namespace(0) not in kernel.namespaces()


def test_a_failing_command_removes_what_was_built() -> None:
    p = _two(kernel.me())
    bad = netplan.Plan(p.owner, p.devices, p.namespaces, p.addresses, p.pairs, p.controls)
    object.__setattr__(bad, "setup", lambda: [*p.setup(), ["ip", "link", "set", "nosuchdev", "up"]])
    with pytest.raises(kernel.KernelError, match="nosuchdev"):
        KernelLinks(bad).__enter__()
    assert not set(p.namespaces) & set(kernel.namespaces())
