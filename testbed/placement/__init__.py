"""Placement algorithms behind one interface (see problem.py). The registry lives in
registry.py; this list is what a scenario's `controller.algorithm` may name."""

ALGORITHM_NAMES = (
    "static",
    "greedy",
    "round_robin",
    "resource_aware",
    "resource_aware_ls",
    "layer_dp",
    "layer_dp_dynamic",
    "equal_split",
    "optimal",
)
