"""Computing early over websockets: one agent and its endpoint wired so that data frames'
content goes ahead of their emulated arrival (`WsEndpoint.early`, `send_early`) and the
agent starts the arithmetic on receipt (`DeviceAgent.preview`), as in process
(`Cluster._connect`). For the real clock only: on the virtual clock nothing is gained.
"""

from __future__ import annotations

from typing import Any

from ..agents.device import EARLY_KINDS, DeviceAgent
from ..transport.ws import WsEndpoint


def compute_early(agent: DeviceAgent, ep: WsEndpoint) -> None:
    """From now on `agent` computes early and `ep` sends data frames' content early (call
    on the agent's running loop, once the clock is real). Not with kernel links: content
    sent ahead would pass through the kernel's shaping as traffic of its own."""
    if ep.kernel_links:
        return
    agent.compute_early()
    ep.previewer = agent.preview
    ep.early = _data
    agent.early_send = ep.send_early


def _data(msg: dict[str, Any]) -> bool:
    return msg.get("t") in EARLY_KINDS
