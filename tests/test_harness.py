"""Every kind of emulated world implements the one interface a run uses
(testbed/harness/interface.py)."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

from testbed.experiments import run as experiment
from testbed.harness.cluster import Cluster
from testbed.harness.interface import World
from testbed.harness.remote import ProcessCluster
from testbed.harness.wscluster import WsCluster

from .conftest import make_scenario

METHODS = [n for n, v in vars(World).items() if inspect.isfunction(v) and not n.startswith("_")]


def _no_fault(where: str, what: str) -> None:
    raise AssertionError(f"{where}: {what}")


@pytest.mark.parametrize("kind", ["inproc", "ws", "processes"])
def test_every_cluster_is_a_world(kind: str) -> None:
    prep = experiment.prepare(make_scenario(n_devices=3, new_tokens=2))

    async def build() -> Any:
        world = experiment.make_world(prep, "ws" if kind == "ws" else "inproc", kind == "processes", _no_fault)
        try:
            assert isinstance(world, World)
            assert type(world) is {"inproc": Cluster, "ws": WsCluster, "processes": ProcessCluster}[kind]
            for name in METHODS:  # same kind of callable: coroutine where the interface has one
                want, got = getattr(World, name), getattr(type(world), name)
                assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(want), name
                assert list(inspect.signature(got).parameters) == list(inspect.signature(want).parameters), name
            assert world.pids() == {}  # nothing started yet
        finally:
            await world.stop()

    asyncio.run(build())


def test_the_interface_names_what_a_run_uses() -> None:
    assert set(METHODS) == {"start", "stop", "port", "oracle", "apply", "background", "device_rows",
                            "link_rows", "frame_counts", "pids"}
    assert set(World.__annotations__) == {"frame_extra", "loop", "failed"}


def test_a_class_missing_a_method_is_not_a_world() -> None:
    class Partial:
        frame_extra, loop, failed = 0, None, set()

        async def start(self) -> None: ...

    assert not isinstance(Partial(), World)
