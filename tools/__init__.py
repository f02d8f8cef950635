"""Analysis tools (`python -m tools.NAME`): latency tables, comparisons, plots, the view of
finished runs and its self-contained HTML report, the GGUF cross-check against transformers,
and headless Chromium for the page's tests; benchmarks in `tools.bench`, the documentation's
upkeep in `tools.docs`.

Owns analysis that is not part of a run. May import `testbed` (including the harness, to
drive clusters directly) and heavy optional libraries (matplotlib, transformers); nothing in
`testbed` or `runners` imports a tool.
"""
