"""Name -> placement algorithm. Every algorithm has `name`, `dynamic` (re-plans at decision
epochs and on emergencies) and `place(snapshot) -> Placement`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import ALGORITHM_NAMES
from .baselines import Greedy, RoundRobin
from .local_search import ResourceAwareLS
from .resource_aware import ResourceAware, Static

_FACTORIES: dict[str, Callable[[], Any]] = {
    "static": Static,
    "greedy": Greedy,
    "round_robin": RoundRobin,
    "resource_aware": ResourceAware,
    "resource_aware_ls": ResourceAwareLS,
}
assert set(_FACTORIES) == set(ALGORITHM_NAMES), "registry and ALGORITHM_NAMES disagree"


def get_algorithm(name: str) -> Any:
    try:
        return _FACTORIES[name]()
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHM_NAMES)}") from None
