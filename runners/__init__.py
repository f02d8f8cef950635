"""Command lines: `run` (a scenario), `sweep` (the paper's experiments), `paper_report` (rebuild
the paper report), `agent` (one device agent in its own process).

Owns only argument parsing, console output and exit statuses (2 for bad input); the work
is in `testbed`. May import `testbed` and console libraries (rich); never imports `tools`,
and nothing imports a runner.
"""
