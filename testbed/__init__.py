"""The testbed library: the emulated edge cluster, the system under test and the
experiments that run it.

Owns nothing but the layer order of its packages, top down (`LAYERS`): `experiments` (one
run end to end, its calibration and verdicts, the paper's experiments and their report),
`webview` (watching runs), `harness` (the emulated world), `agents` (the system under test),
`transport`, `emulation` (clock, links, compute, memory), `analytic` (the paper-style
instances and their analytic simulation), `grid` (experiment files: a grid of scenario
values, algorithms and seeds, and its statistics), `scenario` (the format), `placement` (the
problem, the algorithms and the control policy), `model` (sizes, costs, torch blocks), `results`
(writing and reading run directories) and `common` (units and the percentile). A package
may import those below it, never those above; nothing here imports `runners` or `tools`.
`PURE` names the pure core: no asyncio, no aiohttp and no torch, however indirectly.
tests/test_imports.py enforces both.
"""

LAYERS = ("experiments", "webview", "harness", "agents", "transport", "emulation", "analytic",
          "grid", "scenario", "placement", "model", "results", "common")
PURE = ("analytic", "grid", "scenario", "placement", "results", "common", "model.spec", "model.cost", "emulation.bucket",
        "harness.netplan")
