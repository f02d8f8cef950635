"""The routing table as one device reads it: the run's devices, the device of every block
(`assign`, in the model's block order) and the table's version; who hosts a block, which
head groups of a layer are here, and where a layer's input goes. Pure: no IO, no asyncio."""

from __future__ import annotations

from collections.abc import Sequence

from ..model.spec import ModelSpec


class Routing:
    """One device's (`me`) view of the controller's routing table; empty (version -1) until
    the first `route`. A layer or block with no entry raises KeyError where a device is
    asked for (`proj`, `ffn`, `layer_targets`, `host`)."""

    def __init__(self, model: ModelSpec, me: str) -> None:
        self.model, self.me = model, me
        self.version = -1
        self._hosts: dict[str, str] = {}  # block -> device
        self._my_heads: dict[int, list[int]] = {}  # layer -> head groups here
        self._head_devs: dict[int, list[str]] = {}  # layer -> devices of its heads, in order
        self._proj: dict[int, str] = {}
        self._ffn: dict[int, str] = {}  # layer -> device of its ffn (shard 0 when sharded)
        self._my_shards: dict[int, list[int]] = {}  # layer -> its ffn shards here
        self._shard_devs: dict[int, list[str]] = {}  # layer -> devices of its ffn shards, in order

    def set(self, devices: Sequence[str], assign: Sequence[int], version: int) -> None:
        """Replace the table: block i of the model is on `devices[assign[i]]`."""
        hosts: dict[str, str] = {}
        my_heads: dict[int, list[int]] = {}
        head_devs: dict[int, list[str]] = {}
        proj: dict[int, str] = {}
        ffn: dict[int, str] = {}
        my_shards: dict[int, list[int]] = {}
        shard_devs: dict[int, list[str]] = {}
        for b, j in zip(self.model.blocks, assign, strict=True):
            dev = hosts[b.name] = devices[j]
            if b.kind == "head":
                if dev == self.me:
                    my_heads.setdefault(b.layer, []).append(b.index)
                devs = head_devs.setdefault(b.layer, [])
                if dev not in devs:
                    devs.append(dev)
            elif b.kind == "proj":
                proj[b.layer] = dev
            else:
                if b.index == 0:
                    ffn[b.layer] = dev
                if dev == self.me:
                    my_shards.setdefault(b.layer, []).append(b.index)
                sdevs = shard_devs.setdefault(b.layer, [])
                if dev not in sdevs:
                    sdevs.append(dev)
        self._hosts, self._my_heads, self._head_devs, self._proj, self._ffn = hosts, my_heads, head_devs, proj, ffn
        self._my_shards, self._shard_devs = my_shards, shard_devs
        self.version = version

    @property
    def routed(self) -> bool:
        return self.version >= 0

    def host(self, block: str) -> str:
        return self._hosts[block]

    def my_heads(self, layer: int) -> list[int]:
        """The head groups of `layer` routed here, in the model's order (none: [])."""
        return self._my_heads.get(layer, [])

    def proj(self, layer: int) -> str:
        return self._proj[layer]

    def ffn(self, layer: int) -> str:
        return self._ffn[layer]

    def ffn_targets(self, layer: int) -> list[str]:
        """Devices that need proj's output of `layer`: those of its ffn shards, shard 0's
        first (one device when the FFN is not sharded)."""
        return list(self._shard_devs[layer])

    def my_shards(self, layer: int) -> list[int]:
        """The ffn shards of `layer` routed here, in order (none: [])."""
        return self._my_shards.get(layer, [])

    def proj_here(self, layer: int) -> bool:
        return self._proj.get(layer) == self.me

    def ffn_here(self, layer: int) -> bool:
        return self._ffn.get(layer) == self.me

    def layer_targets(self, layer: int) -> list[str]:
        """Devices that need the input of `layer`: its head devices, then its proj device."""
        out = list(self._head_devs[layer])
        if self._proj[layer] not in out:
            out.append(self._proj[layer])
        return out
