"""Placement: the problem (problem.py: snapshot, placement, latency estimate, objective),
the algorithms behind the `Algorithm` protocol (algorithm.py), plug-ins, and the control
policy (policy.py) that decides when and how the controller and the analytic simulation
call them.

Owns every rule that decides where blocks go and when they move. Pure: numpy and scipy,
`testbed.model` sizes and costs; no asyncio, no torch, no IO, no clock (the policy gets
`now` and outcomes as arguments). Never imports agents, harness, experiment or runners.
The registry lives in registry.py; ALGORITHM_NAMES is what a scenario's
`controller.algorithm` may name."""

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
