"""Upkeep of the documentation: the generated figures and the scenario reference.

Owns `figures` (the deterministic figures README.md and docs/ quote, regenerated and
checked), `markers` (the generated sections of a text file) and `scenario_reference` (the
scenario keys documented against the loader's own table). They import the library and the
analysis tools.
"""
