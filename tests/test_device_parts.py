"""The device agent's pure parts (testbed/agents/routing.py, join.py, admission.py): one
device's reading of the routing table, the projection join that gathers proj's inputs, and
the per-sender quota that bounds what a peer can make a device hold."""

from __future__ import annotations

import pytest
import torch

from testbed.agents.admission import Quota
from testbed.agents.errors import ProtocolError
from testbed.agents.join import ProjectionJoin
from testbed.agents.routing import Routing
from testbed.model.spec import from_name

S = from_name("gpt-tiny")


def _assign(where: dict[str, int], default: int) -> list[int]:
    return [where.get(b.name, default) for b in S.blocks]


def test_an_unrouted_device_knows_no_host_and_no_targets() -> None:
    r = Routing(S, "a")
    assert not r.routed and r.my_heads(0) == [] and not r.proj_here(0) and not r.ffn_here(0)
    with pytest.raises(KeyError):
        r.layer_targets(0)
    with pytest.raises(KeyError):
        r.proj(0)


def test_routing_says_who_hosts_each_block_and_where_a_layer_input_goes() -> None:
    assert S.groups >= 2
    devices = ["a", "b", "c"]
    # layer 0: head group 1 on a, every other head on b, proj on c, ffn on a; the rest on b
    where = {"head.0.1": 0, "proj.0": 2, "ffn.0": 0}
    r = Routing(S, "a")
    r.set(devices, _assign(where, 1), version=3)
    assert r.routed and r.version == 3
    assert r.my_heads(0) == [1] and r.my_heads(1) == []
    assert r.host("head.0.0") == "b" and r.host("proj.0") == "c" and r.host("ffn.0") == "a"
    assert r.proj(0) == "c" and not r.proj_here(0) and r.ffn_here(0) and r.ffn(1) == "b"
    # head devices in the model's order (b holds group 0, a group 1), then proj's device once
    assert r.layer_targets(0) == ["b", "a", "c"]
    assert r.layer_targets(1) == ["b"]  # heads and proj on the same device: listed once
    # a new table replaces the old one entirely
    r.set(devices, _assign({}, 2), version=4)
    assert r.my_heads(0) == [] and r.layer_targets(0) == ["c"] and r.version == 4
    with pytest.raises(ValueError):
        r.set(devices, [0], version=5)  # an assignment must give every block a device


def test_a_quota_refuses_a_sender_at_its_limit_and_frees_what_it_gives_back() -> None:
    q = Quota(2, "{sender} holds {limit}")
    q.take("p")
    q.check("p")
    q.take("p")
    with pytest.raises(ProtocolError, match="p holds 2"):
        q.check("p")
    q.check("other")  # per sender
    q.give("p")
    q.check("p")
    assert q.held("p") == 1


def test_the_join_is_complete_with_the_residual_and_every_group_and_keeps_the_latest_due_time() -> None:
    w = S.q_per_group * S.d_head
    j = ProjectionJoin(S.groups, w, quota=4)
    key = (7, 0)
    x = torch.randn(2, S.d_model)
    out = torch.arange(2 * S.groups * w, dtype=torch.float32).reshape(2, S.groups * w)
    j.add_outputs(key, "h1", 2.0, list(range(S.groups - 1)), out[:, :(S.groups - 1) * w])
    assert not j.ready(key)
    j.add_residual(key, "f", 1.0, x)
    assert not j.ready(key)
    j.add_outputs(key, "h2", None, [S.groups - 1], out[:, (S.groups - 1) * w:])
    assert j.ready(key) and len(j) == 1
    got = j.take(key)
    assert len(j) == 0 and not j.ready(key)
    assert got.due == 2.0 and got.by == {"h1", "f", "h2"} and got.residual is x
    for g in range(S.groups):  # each group's slice of the side-by-side outputs
        assert torch.equal(got.outputs[g], out[:, g * w:(g + 1) * w])


def test_the_join_bounds_the_entries_each_peer_contributes_to_and_frees_them() -> None:
    w = S.q_per_group * S.d_head
    j = ProjectionJoin(S.groups, w, quota=2)
    out = torch.zeros(1, w)
    j.add_outputs((1, 0), "p", None, [0], out)
    j.add_outputs((1, 0), "p", None, [1], out)  # the same entry again: no more quota used
    j.add_outputs((2, 0), "p", None, [0], out)
    with pytest.raises(ProtocolError, match="p already contributes to 2"):
        j.add_outputs((3, 0), "p", None, [0], out)
    j.add_outputs((3, 0), "q", None, [0], out)  # another peer has its own quota
    j.drop_through(2)  # an abort: attempts 1 and 2 go, and p's quota with them
    assert sorted(j) == [(3, 0)]
    j.add_outputs((4, 0), "p", None, [0], out)
    j.add_outputs((5, 0), "p", None, [0], out)
