"""Benchmarks: each prints figures measured on this host (`python -m tools.bench.NAME`).

Owns the measurements behind the speed and fidelity figures in docs/ (links, real time,
decisions, GGUF loading, the live view, refusals, hostile inputs). They import the library
and nothing of `runners`.
"""
