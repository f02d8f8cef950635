"""Name -> placement algorithm: the built-in table, and plug-ins from outside (plugins.py).

Every algorithm implements the `Algorithm` protocol (algorithm.py): `name`, `dynamic`
(re-plans at decision epochs and on emergencies) and `place(snapshot) -> Placement`.
`lookup` turns what `--algorithm` names into a built-in name or a checked `Plugin`;
`instantiate` makes a fresh algorithm for one run from either."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import ALGORITHM_NAMES
from .algorithm import Algorithm
from .baselines import Greedy, RoundRobin
from .layer_based import EqualSplit, LayerDP, LayerDPDynamic
from .local_search import ResourceAwareLS
from .plugins import Plugin, load
from .resource_aware import ResourceAware, Static


def _optimal() -> Any:
    from .optimal import Optimal  # scipy's MILP is imported only when asked for

    return Optimal()


_FACTORIES: dict[str, Callable[[], Any]] = {
    "static": Static,
    "greedy": Greedy,
    "round_robin": RoundRobin,
    "resource_aware": ResourceAware,
    "resource_aware_ls": ResourceAwareLS,
    "layer_dp": LayerDP,
    "layer_dp_dynamic": LayerDPDynamic,
    "equal_split": EqualSplit,
    "optimal": _optimal,
}
assert set(_FACTORIES) == set(ALGORITHM_NAMES), "registry and ALGORITHM_NAMES disagree"


def size_problem(name: str, layers: int, devices: int) -> str | None:
    """Why an algorithm refuses an instance of this size (None if it does not)."""
    if name != "optimal":
        return None
    from .optimal import MAX_LAYERS, MAX_SIZE

    if layers * devices * devices > MAX_SIZE or layers > MAX_LAYERS:
        return (f"optimal solves instances up to layers x devices^2 = {MAX_SIZE} and {MAX_LAYERS} layers "
                f"(this one: {layers} layers x {devices} devices = {layers * devices * devices})")
    return None


def get_algorithm(name: str) -> Any:
    try:
        return _FACTORIES[name]()
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHM_NAMES)}") from None


def lookup(spec: str) -> str | Plugin:
    """A built-in name as it is; otherwise the plug-in `spec` names (`file.py:Class`,
    `module:Class` or an installed entry-point name), loaded and checked. Raises
    `plugins.PluginRefused` (one line) when it cannot be used."""
    return spec if spec in ALGORITHM_NAMES else load(spec)


def instantiate(algorithm: str | Plugin | Algorithm) -> Algorithm:
    """A fresh algorithm for one run: a built-in by name, a guarded plug-in instance, or an
    algorithm object as it is."""
    if isinstance(algorithm, str):
        return get_algorithm(algorithm)
    if isinstance(algorithm, Plugin):
        return algorithm.create()
    return algorithm
