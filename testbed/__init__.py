"""The testbed library: the emulated edge cluster, the system under test and the
experiments that run it.

Owns, top-down: `experiment` (one run end to end), `sweep` and `paper_report` (the paper's
experiments in analytic mode and their report), the `harness` (the emulated world), the
system under test in `agents`, and below them the pure core: `placement` (the problem,
the algorithms and the control policy), `scenario` (the format: its entry points, over
`scenario_format`, `scenario_records`, `scenario_sections` and `scenario_reader`), `model`
(sizes, costs, torch blocks), `emulation` (clock, links, compute, memory) and `transport`.
A package may import those below it, never those above; nothing here imports `runners` or
`tools` (tests/test_imports.py enforces the rules each package states).
"""
