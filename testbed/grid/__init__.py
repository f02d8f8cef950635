"""Experiments of a user's own: a grid over any scenario value, algorithms and seeds.

Owns the experiment file format (`spec`: reading it strictly, expanding its axes into
cells, resolving every cell to a scenario, the hash that names each run) and the
statistics of a grid's results (`stats`: the figures read from a run's summary, their
mean, standard deviation and 95 % confidence interval per cell and algorithm). Running
the grid is not owned here: testbed/experiments/grid_run.py is the shell that does, and
`python -m runners.sweep EXPERIMENT.yaml` its command line. Pure core: imports `scenario`
and `common` below it (testbed.LAYERS), yaml and scipy's t distribution; no asyncio, no
torch, no IO but reading the experiment file and its base scenario.
"""
