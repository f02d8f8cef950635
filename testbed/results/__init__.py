"""Run directories: writing them as a run goes, and reading them back.

Owns `write` (the result files of one run, written row by row, and the statistics of the
summary) and `read` (finding run directories and reading them, shared by the analysis tools
and the report). The bottom layer: it imports no other package of testbed (testbed.LAYERS),
and no asyncio or torch.
"""
