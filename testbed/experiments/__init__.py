"""One run end to end, and what is built from runs.

Owns `run` (a scenario with one algorithm: the reference, the world, the controller, the
scenario events, the run directory, the summary and its fidelity verdict), `timescale`
(choosing the real clock's time scale), `hostload` (the host's CPU and memory during a run),
`twin` (a real-clock run against its virtual twin), `crosscheck` (the analytic simulation
against the emulator) and `paper_report` (the paper's experiments' tables, figures and
README). The top layer: it may import every other package of testbed (testbed.LAYERS).
"""
