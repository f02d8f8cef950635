"""Benchmarks and analysis tools (`python -m tools.NAME`): link, decision and real-time
benchmarks, the GGUF cross-check against transformers, plots and comparisons of run
directories.

Owns measurement and analysis that is not part of a run. May import `testbed` (including
the harness, to drive clusters directly) and heavy optional libraries (matplotlib,
transformers); nothing in `testbed` or `runners` imports a tool.
"""
