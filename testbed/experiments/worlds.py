"""The emulated cluster a run asks for: agents in this process over in-process queues or
websockets, or agents in processes of their own, some maybe on other hosts.

Owns `make_world`, the one place that turns a run's transport options into a `World`.
"""

from __future__ import annotations

from collections.abc import Callable

from ..harness.cluster import Cluster
from ..harness.interface import World
from .prepare import Prepared


def make_world(prep: Prepared, transport: str, processes: bool, on_fault: Callable[[str, str], None],
               attach: dict[str, str] | None = None,
               on_lost: Callable[[str, str], None] | None = None, links: str = "emulated",
               framing: int = 0) -> World:
    """The emulated cluster for a run: agents in this process over in-process queues or
    websockets, or agents in their own processes (websockets), some maybe on other hosts;
    `links="kernel"`: agent processes in network namespaces, their links shaped by the kernel;
    `framing`: in process, bytes charged on every frame beyond its own (`Cluster`)."""
    if processes or attach:
        from ..harness.remote import ProcessCluster

        return ProcessCluster(prep.scenario, prep.model, on_fault, attach=attach, on_lost=on_lost, links=links)
    if transport == "ws":
        from ..harness.wscluster import WsCluster

        return WsCluster(prep.scenario, prep.model, prep.weights, on_fault)
    return Cluster(prep.scenario, prep.model, prep.weights, on_fault, framing)


def twin_framing(transport: str, processes: bool) -> int:
    """The bytes per frame a run's virtual twin (in process) charges to stand for the run's
    transport: the websocket transport's `due` entry on every frame, none in process. With
    them the twin's links carry what the run's carry, byte for byte."""
    if transport == "inproc" and not processes:
        return 0
    from ..transport.ws import FRAME_EXTRA

    return FRAME_EXTRA
